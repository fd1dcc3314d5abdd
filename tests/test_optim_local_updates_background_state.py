"""With use_local_updates and delay_state_averaging, local steps go on while the state averages in the background."""

import time

import pytest
import torch
from optim_swarm_helpers import dht_pair, make_optimizer, wait_for

__all__ = ["dht_pair"]  # the fixture, used below


@pytest.mark.timeout(40)
def test_a_local_step_does_not_wait_for_the_background_state_averaging_round(dht_pair):
    torch.manual_seed(0)
    models = [torch.nn.Linear(4, 1) for _ in dht_pair]
    x, y = torch.randn(4, 4), torch.randn(4, 1)
    options = dict(target_batch_size=1000, batch_size_per_step=None, use_local_updates=True,
                   delay_state_averaging=True, matchmaking_time=3.0, averaging_timeout=6.0)  # fmt: skip
    opts = [make_optimizer(dht, model, "local_updates_no_wait", **options) for dht, model in zip(dht_pair, models)]
    trainer, _idle = opts  # the idle peer is in the swarm but never averages: the trainer's round runs long

    def local_step(batch_size: int) -> None:
        trainer.zero_grad()
        torch.nn.functional.mse_loss(models[0](x), y).backward()
        trainer.step(batch_size=batch_size)

    try:
        wait_for(lambda: all(opt.tracker.global_progress.num_peers == 2 for opt in opts))
        local_step(1000)  # the whole epoch at once: the epoch ends, a state round starts in the background
        assert trainer.local_epoch == 1 and trainer.state_averager.averaging_in_progress

        started = time.monotonic()
        before = [param.detach().clone() for param in models[0].parameters()]
        local_step(1)  # a local update, far from the end of epoch 1
        assert time.monotonic() - started < 1.5
        assert trainer.local_epoch == 1 and trainer.state_averager.averaging_in_progress  # (still in the background)
        assert not all(torch.equal(old, new) for old, new in zip(before, models[0].parameters()))
    finally:
        for opt in opts:
            opt.shutdown()
