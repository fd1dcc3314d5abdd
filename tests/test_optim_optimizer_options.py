"""hivemind.Optimizer's option checks: derived defaults and refused combinations, without starting any peer."""

import pytest
import torch

from hivemind.optim.optimizer_options import resolve_options

PARAMS = [torch.nn.Parameter(torch.zeros(3))]


def factory(params):
    return torch.optim.SGD(params, lr=0.1)


def resolve(**overrides):
    kwargs = dict(
        run_id="run", target_batch_size=64, batch_size_per_step=8, optimizer=factory, params=PARAMS, scheduler=None,
        matchmaking_time=1.0, averaging_timeout=5.0, allreduce_timeout=None, next_chunk_timeout=None,
        reuse_grad_buffers=False, offload_optimizer=None, delay_optimizer_step=None, delay_grad_averaging=False,
        average_state_every=1, use_local_updates=False, client_mode=False, auxiliary=False, grad_averager_factory=None,
    )  # fmt: skip
    kwargs.update(overrides)
    return resolve_options(**kwargs)


def test_defaults_offload_with_a_factory_and_derive_timeouts():
    options = resolve()
    assert options.offload_optimizer and not options.delay_optimizer_step
    assert options.allreduce_timeout == 5.0 and options.next_chunk_timeout == 1.0


def test_no_offload_with_a_built_optimizer_or_local_updates():
    assert not resolve(optimizer=torch.optim.SGD(PARAMS, lr=0.1), params=None).offload_optimizer
    assert not resolve(use_local_updates=True).offload_optimizer


def test_delay_grad_averaging_implies_delayed_optimizer_step():
    assert resolve(delay_grad_averaging=True).delay_optimizer_step


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(run_id="a.b"), "run_id"),
        (dict(target_batch_size=0), "target_batch_size"),
        (dict(params=None), "params="),
        (dict(optimizer=torch.optim.SGD(PARAMS, lr=0.1)), "params="),
        (dict(optimizer="adam"), "factory"),
        (dict(scheduler=torch.optim.lr_scheduler.StepLR(torch.optim.SGD(PARAMS, lr=0.1), 1)), "scheduler"),
        (dict(delay_grad_averaging=True, delay_optimizer_step=False), "delay_optimizer_step"),
        (dict(delay_optimizer_step=True, offload_optimizer=False), "offload_optimizer"),
        (dict(optimizer=torch.optim.SGD(PARAMS, lr=0.1), params=None, offload_optimizer=True), "factory"),
        (dict(use_local_updates=True, reuse_grad_buffers=True), "reuse_grad_buffers"),
        (dict(use_local_updates=True, grad_averager_factory=object()), "grad_averager_factory"),
        (dict(auxiliary=True, client_mode=True), "auxiliary"),
        (dict(auxiliary=True), "batch_size_per_step"),
        (dict(average_state_every=0), "average_state_every"),
        (dict(matchmaking_time=10.0, averaging_timeout=5.0), "averaging_timeout"),
    ],
)
def test_refused_combinations_say_what_to_change(overrides, message):
    with pytest.raises(ValueError, match=message):
        resolve(**overrides)
