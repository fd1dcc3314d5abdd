"""
Peers one epoch apart that average gradients together must land in the same epoch afterwards. With
delay_optimizer_step (and synchronous gradient averaging), a peer's once-per-epoch check can run before the others
publish the epoch they just entered; it then stays one epoch behind them, each later gradient round (which includes
everyone) keeps the gap, and every state average mixes two epochs and is never applied, so parameters drift apart.
"""

import threading

import pytest
import torch
from optim_swarm_helpers import joined_optimizers, mse_step, swarm, wait_for  # noqa: F401 (swarm is a fixture)

from hivemind.optim.epoch_rule import epoch_after_gradient_round

BATCH = (torch.ones(4, 3), torch.zeros(4, 1))


def _step_until_next_epoch(opt, model, errors):
    try:
        start = opt.local_epoch
        for _ in range(200):
            mse_step(model, opt, *BATCH)
            if opt.local_epoch != start:
                return
        errors.append(AssertionError(f"epoch {start} never ended"))
    except BaseException as e:  # reported by the test thread
        errors.append(e)


@pytest.mark.timeout(60)
def test_peers_one_epoch_apart_in_a_gradient_round_land_in_the_same_epoch(swarm):  # noqa: F811
    dhts = swarm(2)
    torch.manual_seed(0)
    models = [torch.nn.Linear(3, 1) for _ in dhts]  # different parameters: only a state average makes them equal
    with joined_optimizers(
        dhts,
        models,
        delay_optimizer_step=True,
        delay_grad_averaging=False,
        matchmaking_time=3.0,
        averaging_timeout=10.0,
    ) as (ahead, behind):
        with ahead.tracker.pause_updates():  # the split: one peer is already in the next epoch
            ahead.state_averager.local_epoch = 1
            ahead._restart_epoch()
        wait_for(lambda: behind.tracker.global_epoch == 1)
        # the laggard's once-per-epoch check already ran (before the other peer's record for epoch 1 arrived)
        behind._should_check_synchronization_on_update = False
        errors = []
        threads = [
            threading.Thread(target=_step_until_next_epoch, args=(opt, model, errors))
            for opt, model in ((behind, models[1]), (ahead, models[0]))
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(40)
        assert not errors, errors
        assert ahead._last_round_peers == behind._last_round_peers and len(ahead._last_round_peers) == 2
        assert (ahead.local_epoch, behind.local_epoch) == (2, 2)
        for opt in (ahead, behind):  # the delayed step and the state round of epoch 2 land
            opt.state_averager.step(wait_for_delayed_updates=True)
        for param_ahead, param_behind in zip(models[0].parameters(), models[1].parameters()):
            assert torch.allclose(param_ahead, param_behind, atol=1e-6), (param_ahead, param_behind)


def test_the_epoch_after_a_gradient_round_is_one_past_its_latest_member_within_the_swarms_epoch():
    assert epoch_after_gradient_round(5, 5, [5, 5, None]) == 6  # in step (or a peer of hivemind 1.1.12: None)
    assert epoch_after_gradient_round(5, 6, [5, 6, 6]) == 7  # one behind: lands with the others
    assert epoch_after_gradient_round(6, 6, [5, 6]) == 7  # one ahead: a laggard does not hold it back
    assert epoch_after_gradient_round(5, 6, [10**9, True, "7"]) == 6  # claims above the swarm's epoch are ignored
