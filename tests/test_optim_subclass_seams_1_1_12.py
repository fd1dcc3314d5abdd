"""hivemind.Optimizer calls its factory hooks as 1.1.12 does, so that subclasses written for 1.1.12 keep working:
_make_progress_tracker(target_batch_size, **kwargs) first, then _make_state_averager(**kwargs) and
_make_gradient_averager(factory, **kwargs) with the grad_averager_factory passed positionally and only
``compression`` and ``reuse_grad_buffers`` as keywords. What this implementation needs besides (offloaded gradient
buffers, auxiliary mode, the epoch spread of local updates, the user's averager_opts) the base methods add."""

import functools

import pytest
import torch
from optim_swarm_helpers import make_optimizer, mse_step

from hivemind.dht import DHT
from hivemind.optim.grad_averager import GradientAverager
from hivemind.optim.optimizer import Optimizer
from hivemind.optim.power_sgd_averager import PowerSGDGradientAverager

STATE_KEYWORDS = [
    "average_opt_statistics", "compression", "delta_rule_averaging", "extra_tensors", "optimizer", "params",
    "performance_ema_alpha", "scheduler", "state_compression",
]  # fmt: skip
GRADIENT_KEYWORDS = ["compression", "reuse_grad_buffers"]


@pytest.fixture
def dht():
    dht = DHT(start=True)
    yield dht
    dht.shutdown()


class FixedShapes(Optimizer):
    """Overrides with 1.1.12's exact keyword lists and no **kwargs."""

    def _make_progress_tracker(self, target_batch_size, *, performance_ema_alpha, min_refresh_period,
                               max_refresh_period, default_refresh_period):  # fmt: skip
        self.calls = [("tracker", target_batch_size)]
        return super()._make_progress_tracker(
            target_batch_size, performance_ema_alpha=performance_ema_alpha, min_refresh_period=min_refresh_period,
            max_refresh_period=max_refresh_period, default_refresh_period=default_refresh_period,
        )  # fmt: skip

    def _make_state_averager(self, *, optimizer, params, scheduler, delta_rule_averaging, average_opt_statistics,
                             extra_tensors, compression, state_compression, performance_ema_alpha):  # fmt: skip
        self.calls.append(("state", self.tracker is not None))  # the tracker is made first
        return super()._make_state_averager(
            optimizer=optimizer, params=params, scheduler=scheduler, delta_rule_averaging=delta_rule_averaging,
            average_opt_statistics=average_opt_statistics, extra_tensors=extra_tensors, compression=compression,
            state_compression=state_compression, performance_ema_alpha=performance_ema_alpha,
        )  # fmt: skip

    def _make_gradient_averager(self, factory, *, reuse_grad_buffers, compression):
        self.calls.append(("gradient", factory))
        return super()._make_gradient_averager(factory, reuse_grad_buffers=reuse_grad_buffers, compression=compression)


class KeywordShapes(Optimizer):
    """Overrides that record what they are given and pass it on (as the 1.1.12 forms with **kwargs do)."""

    def _make_progress_tracker(self, target_batch_size, **kwargs):
        self.calls = [("tracker", target_batch_size)]
        return super()._make_progress_tracker(target_batch_size, **kwargs)

    def _make_state_averager(self, **kwargs):
        self.calls.append(("state", sorted(kwargs)))
        return super()._make_state_averager(**kwargs)

    def _make_gradient_averager(self, factory, **kwargs):
        self.calls.append(("gradient", factory, sorted(kwargs)))
        return super()._make_gradient_averager(factory, **kwargs)


POWER_SGD = functools.partial(PowerSGDGradientAverager, averager_rank=1)
CASES = dict(
    plain={}, local_updates=dict(use_local_updates=True), offload=dict(offload_optimizer=True),
    auxiliary=dict(auxiliary=True, batch_size_per_step=None), factory=dict(grad_averager_factory=POWER_SGD),
)  # fmt: skip


def _train_one_epoch_alone(opt: Optimizer, model: torch.nn.Module) -> bool:
    """Two steps of 4 samples (one epoch) with gradients that are not zero: whether the parameters moved."""
    before = [param.detach().clone() for param in model.parameters()]
    x, y = torch.ones(4, 2), torch.full((4, 1), 10.0)
    while opt.local_epoch == 0:
        mse_step(model, opt, x, y)
    return any(not torch.equal(old, new.detach()) for old, new in zip(before, model.parameters()))


def _check_parts(opt: Optimizer, options: dict) -> None:
    if options.get("use_local_updates"):
        assert opt.grad_averager is None and opt.state_averager.max_epoch_spread == 1
        return
    assert opt.state_averager.max_epoch_spread == 0
    expected_type = PowerSGDGradientAverager if "grad_averager_factory" in options else GradientAverager
    assert type(opt.grad_averager) is expected_type
    assert opt.grad_averager.warn is not options.get("auxiliary", False)  # an auxiliary peer is not told off


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", list(CASES))
def test_overrides_with_the_fixed_keywords_of_1_1_12_build_every_part(dht, case):
    options = CASES[case]
    model = torch.nn.Linear(2, 1)
    opt = make_optimizer(dht, model, "fixed_shapes", averager_opts=None, **options, optimizer_class=FixedShapes)
    try:
        expected = [("tracker", 8), ("state", True)]
        if not options.get("use_local_updates"):
            expected.append(("gradient", options.get("grad_averager_factory")))
        assert opt.calls == expected
        _check_parts(opt, options)
        if not options.get("auxiliary"):  # (offloaded: the averaged gradients reach the offloaded optimizer)
            assert _train_one_epoch_alone(opt, model)
    finally:
        opt.shutdown()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", list(CASES))
def test_overrides_with_kwargs_receive_what_1_1_12_passes(dht, case):
    options = CASES[case]
    opt = make_optimizer(dht, torch.nn.Linear(2, 1), "kwargs_shapes", **options, optimizer_class=KeywordShapes)
    try:
        expected = [("tracker", 8), ("state", sorted(STATE_KEYWORDS + ["request_timeout"]))]
        if not options.get("use_local_updates"):
            expected.append(("gradient", options.get("grad_averager_factory"), GRADIENT_KEYWORDS))
            assert opt.grad_averager.request_timeout == 0.5  # the user's averager_opts, added by the base method
        assert opt.calls == expected
        _check_parts(opt, options)
    finally:
        opt.shutdown()


@pytest.mark.timeout(60)
def test_averager_opts_that_only_the_state_averager_takes_are_accepted(dht):
    opt = make_optimizer(
        dht, torch.nn.Linear(2, 1), "state_only_opts", performance_ema_alpha=0.3,
        averager_opts=dict(request_timeout=0.5, sync_epoch_when_averaging=True, parameter_names=["w", "b"]),
    )  # fmt: skip
    try:
        assert opt.state_averager.sync_epoch_when_averaging and opt.state_averager.parameter_names == ("w", "b")
        assert opt.state_averager.delay_before_averaging.alpha == 0.3  # the user's performance_ema_alpha
        assert opt.grad_averager.request_timeout == 0.5
    finally:
        opt.shutdown()


def test_averager_opts_cannot_repeat_performance_ema_alpha(dht):
    with pytest.raises(TypeError, match="averager_opts cannot set performance_ema_alpha"):
        make_optimizer(dht, torch.nn.Linear(2, 1), "repeated_alpha", averager_opts=dict(performance_ema_alpha=0.5))


@pytest.mark.timeout(60)
def test_a_failing_state_averager_override_stops_the_tracker_made_before_it(dht):
    trackers = []

    class Failing(Optimizer):
        def _make_state_averager(self, **kwargs):
            trackers.append(self.tracker)
            raise ValueError("a broken override")

    with pytest.raises(ValueError, match="broken override"):
        make_optimizer(dht, torch.nn.Linear(2, 1), "failing_state", optimizer_class=Failing)
    assert len(trackers) == 1 and not trackers[0].is_alive()


@pytest.mark.timeout(60)
def test_a_grad_averager_factory_gets_the_parameters_by_keyword_and_only_the_options_it_needs(dht):
    calls = []

    def factory(*args, parameters, dht, prefix, reuse_grad_buffers, compression, **kwargs):  # a 1.1.12-style factory
        calls.append((args, sorted(kwargs)))
        return GradientAverager(
            parameters,
            dht=dht,
            prefix=prefix,
            reuse_grad_buffers=reuse_grad_buffers,
            compression=compression,
            **kwargs,
        )

    opt = make_optimizer(dht, torch.nn.Linear(2, 1), "keyword_factory", grad_averager_factory=factory)
    try:
        shared = ["allreduce_timeout", "auxiliary", "client_mode", "min_matchmaking_time", "next_chunk_timeout"]
        # (averaged_grads: with offload_optimizer, on by default here, the gradients are averaged into the
        # offloaded parameters' grads)
        assert calls == [((), sorted(shared + ["averaged_grads", "request_timeout", "shutdown_timeout", "start"]))]
        assert type(opt.grad_averager) is GradientAverager and opt.grad_averager.warn
    finally:
        opt.shutdown()
