"""hivemind.Optimizer.shutdown() waits for a background averaging round at most shutdown_timeout, then cancels it."""

import time

import pytest
import torch
from optim_swarm_helpers import dht_pair, make_optimizer, wait_for

__all__ = ["dht_pair"]  # the fixture, used below


@pytest.mark.timeout(60)
def test_shutdown_cancels_a_background_state_round_that_outlasts_shutdown_timeout(dht_pair):
    torch.manual_seed(0)
    models = [torch.nn.Linear(4, 1) for _ in dht_pair]
    options = dict(target_batch_size=100, batch_size_per_step=None, use_local_updates=True, matchmaking_time=3.0,
                   averaging_timeout=30.0, shutdown_timeout=1.0)  # fmt: skip
    opts = [make_optimizer(dht, model, "bounded_shutdown", **options) for dht, model in zip(dht_pair, models)]
    trainer, idle = opts  # the idle peer is in the swarm but never averages: the trainer's round would run 30 s
    try:
        wait_for(lambda: all(opt.tracker.global_progress.num_peers == 2 for opt in opts))
        torch.nn.functional.mse_loss(models[0](torch.randn(4, 4)), torch.randn(4, 1)).backward()
        trainer.step(batch_size=100)  # the epoch ends: a state round starts in the background
        assert trainer.local_epoch == 1 and trainer.state_averager.averaging_in_progress
        started = time.monotonic()
        trainer.shutdown()
        assert time.monotonic() - started < 1.0 + 4.0
        assert not trainer.state_averager.averaging_in_progress
    finally:
        for opt in opts:
            if not opt._shut_down:
                opt.shutdown()


@pytest.mark.timeout(60)
def test_shutdown_cancels_a_background_gradient_round_that_outlasts_shutdown_timeout(dht_pair):
    torch.manual_seed(0)
    models = [torch.nn.Linear(4, 1) for _ in dht_pair]
    options = dict(target_batch_size=100, batch_size_per_step=None, delay_grad_averaging=True, matchmaking_time=3.0,
                   averaging_timeout=30.0, shutdown_timeout=1.0)  # fmt: skip
    opts = [make_optimizer(dht, model, "bounded_shutdown_grad", **options) for dht, model in zip(dht_pair, models)]
    trainer, idle = opts  # the idle peer is in the swarm but never averages: the trainer's round would run 30 s
    try:
        wait_for(lambda: all(opt.tracker.global_progress.num_peers == 2 for opt in opts))
        before = [param.detach().clone() for param in models[0].parameters()]
        torch.nn.functional.mse_loss(models[0](torch.randn(4, 4)), torch.randn(4, 1)).backward()
        trainer.step(batch_size=100)  # the epoch ends: gradients are averaged (then the step runs) in the background
        assert trainer.local_epoch == 1
        started = time.monotonic()
        trainer.shutdown()
        assert time.monotonic() - started < 1.0 + 4.0
        assert not all(torch.equal(old, new) for old, new in zip(before, models[0].parameters()))  # (local grads)
    finally:
        for opt in opts:
            if not opt._shut_down:
                opt.shutdown()
