"""hivemind.Optimizer.shutdown() waits for a background averaging round at most shutdown_timeout, then cancels it."""

import contextlib
import time

import pytest
import torch
from optim_swarm_helpers import dht_pair, make_optimizer, wait_for

__all__ = ["dht_pair"]  # the fixture, used below


@contextlib.contextmanager
def trainer_beside_an_idle_peer(dht_pair, run_id: str, **mode):
    """(models, trainer): two peers in one swarm, of which the second never averages, so the trainer's rounds would
    run until averaging_timeout (30 s); both are shut down on exit if the test did not."""
    torch.manual_seed(0)
    models = [torch.nn.Linear(4, 1) for _ in dht_pair]
    options = dict(target_batch_size=100, batch_size_per_step=None, matchmaking_time=3.0, averaging_timeout=30.0,
                   shutdown_timeout=1.0, **mode)  # fmt: skip
    opts = [make_optimizer(dht, model, run_id, **options) for dht, model in zip(dht_pair, models)]
    try:
        wait_for(lambda: all(opt.tracker.global_progress.num_peers == 2 for opt in opts))
        yield models, opts[0]
    finally:
        for opt in opts:
            if not opt._shut_down:
                opt.shutdown()


@pytest.mark.timeout(60)
def test_shutdown_cancels_a_background_state_round_that_outlasts_shutdown_timeout(dht_pair):
    with trainer_beside_an_idle_peer(dht_pair, "bounded_shutdown", use_local_updates=True) as (models, trainer):
        torch.nn.functional.mse_loss(models[0](torch.randn(4, 4)), torch.randn(4, 1)).backward()
        trainer.step(batch_size=100)  # the epoch ends: a state round starts in the background
        assert trainer.local_epoch == 1 and trainer.state_averager.averaging_in_progress
        started = time.monotonic()
        trainer.shutdown()
        assert time.monotonic() - started < 1.0 + 4.0
        assert not trainer.state_averager.averaging_in_progress


@pytest.mark.timeout(60)
def test_shutdown_cancels_a_background_gradient_round_that_outlasts_shutdown_timeout(dht_pair):
    with trainer_beside_an_idle_peer(dht_pair, "bounded_shutdown_grad", delay_grad_averaging=True) as (
        models,
        trainer,
    ):
        before = [param.detach().clone() for param in models[0].parameters()]
        torch.nn.functional.mse_loss(models[0](torch.randn(4, 4)), torch.randn(4, 1)).backward()
        trainer.step(batch_size=100)  # the epoch ends: gradients are averaged (then the step runs) in the background
        assert trainer.local_epoch == 1
        started = time.monotonic()
        trainer.shutdown()
        assert time.monotonic() - started < 1.0 + 4.0
        assert not all(torch.equal(old, new) for old, new in zip(before, models[0].parameters()))  # (local grads)
