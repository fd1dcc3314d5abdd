"""With use_local_updates and delay_state_averaging, local steps go on while the state averages in the background."""

import time

import pytest
import torch
from optim_swarm_helpers import dht_pair, make_optimizer, mse_step, wait_for

__all__ = ["dht_pair"]  # the fixture, used below


@pytest.mark.timeout(40)
def test_a_local_step_does_not_wait_for_the_background_state_averaging_round(dht_pair):
    torch.manual_seed(0)
    models = [torch.nn.Linear(4, 1) for _ in dht_pair]
    batch = torch.randn(4, 4), torch.randn(4, 1)
    options = dict(target_batch_size=8, batch_size_per_step=4, use_local_updates=True, delay_state_averaging=True,
                   matchmaking_time=3.0, averaging_timeout=6.0)  # fmt: skip
    opts = [make_optimizer(dht, model, "local_updates_no_wait", **options) for dht, model in zip(dht_pair, models)]
    try:
        trainer, _idle = opts  # the idle peer is in the swarm but never averages: the trainer's round runs long
        wait_for(lambda: all(opt.tracker.global_progress.num_peers == 2 for opt in opts))
        while trainer.local_epoch < 1:
            mse_step(models[0], trainer, *batch)
        assert trainer.state_averager.averaging_in_progress

        started = time.monotonic()
        before = [param.detach().clone() for param in models[0].parameters()]
        mse_step(models[0], trainer, *batch)  # a local update, not the end of the epoch
        assert time.monotonic() - started < 1.5
        assert trainer.state_averager.averaging_in_progress  # the round goes on in the background
        assert not all(torch.equal(old, new) for old, new in zip(before, models[0].parameters()))
    finally:
        for opt in opts:
            opt.shutdown()
