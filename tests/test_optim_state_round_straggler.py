"""
A state round whose group holds a straggler (a member behind the group's latest epoch): the members in step average
among themselves and apply it, the straggler averages with weight 0 and keeps its own state. Before, the result was
refused by everyone (the peers in step lost their round because one was out of step); hivemind 1.1.12 applies the
average of all of them everywhere, so the straggler's stale parameters pull the peers in step back.
"""

import pytest
import torch
from averager_helpers import FAST, dht_swarm, state_rounds_together

from hivemind.optim.epoch_rule import state_round_weight
from hivemind.optim.optimizer import Optimizer
from hivemind.optim.state_averager import TrainingStateAverager


def _round(epochs, values, **options):
    """One state round of len(epochs) averagers of a Linear(2, 1) filled with values; returns the values after it
    and the averagers' round_met_later_epochs."""
    with dht_swarm(len(epochs)) as dhts:
        models = [torch.nn.Linear(2, 1) for _ in dhts]
        averagers = []
        try:
            for dht, model, epoch, value in zip(dhts, models, epochs, values):
                with torch.no_grad():
                    for param in model.parameters():
                        param.fill_(value)
                averager = TrainingStateAverager(
                    dht=dht, prefix="state_round_straggler", optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
                    params=model.parameters(), target_group_size=len(epochs), start=True, **FAST, **options,
                )  # fmt: skip
                averager.local_epoch = epoch
                averagers.append(averager)
            state_rounds_together(averagers)
            results = [sorted({x for p in model.parameters() for x in p.flatten().tolist()}) for model in models]
            return results, [averager.round_met_later_epochs for averager in averagers]
        finally:
            for averager in averagers:
                averager.shutdown()


@pytest.mark.timeout(90)
def test_peers_in_step_apply_their_own_average_when_a_straggler_is_in_the_group():
    results, told = _round([4, 4, 3], [1.0, 3.0, 10.0])
    # the two at epoch 4 get their mean (not (1 + 3 + 10) / 3: the straggler does not pull them back)
    assert results == [[2.0], [2.0], [10.0]]
    assert told == [False, False, True]  # the straggler was told that its round met a later epoch


@pytest.mark.timeout(90)
def test_members_within_the_epoch_spread_average_as_equals():
    # (hivemind.Optimizer with use_local_updates: neighbouring epochs are averaged and applied as before)
    results, told = _round([4, 3], [1.0, 3.0], max_epoch_spread=1)
    assert results == [[2.0], [2.0]]
    assert told == [False, False]


def test_state_round_weight():
    assert state_round_weight(4, [4, 4, 3], 1.0) == 1.0
    assert state_round_weight(3, [4, 4, 3], 1.0) == 0.0
    assert state_round_weight(3, [4, 3], 1.0, spread=1) == 1.0
    assert state_round_weight(2, [4, 2], 1.0, spread=1) == 0.0
    assert state_round_weight("x", [4, "x"], 1.0) == 1.0  # not an epoch: not a round of this rule
    assert state_round_weight(3, [4, 3], 0.0) == 0.0


@pytest.mark.timeout(90)
def test_with_sync_epoch_when_averaging_members_of_any_epoch_average_as_equals():
    # (as hivemind 1.1.12: the epochs are synchronized by the round itself, so a member behind is no straggler; its
    # progress since the last round is averaged in, not dropped, and every member moves to the latest epoch)
    results, told = _round([4, 3], [1.0, 3.0], sync_epoch_when_averaging=True)
    assert results == [[2.0], [2.0]]
    assert told == [False, False]


@pytest.mark.timeout(120)
def test_a_spawned_averager_process_knows_the_epoch_spread():
    results, _ = _round([4, 3], [1.0, 3.0], max_epoch_spread=1, start_method="spawn")
    assert results == [[2.0], [2.0]]


def test_the_optimizer_refuses_an_epoch_spread_in_averager_opts_naming_what_sets_it():
    model = torch.nn.Linear(2, 1)
    with dht_swarm(1) as (dht,), pytest.raises(TypeError, match="cannot set max_epoch_spread: .*use_local_updates"):
        Optimizer(
            dht=dht, run_id="spread_in_averager_opts", target_batch_size=4, batch_size_per_step=1,
            optimizer=lambda p: torch.optim.SGD(p, lr=0.1), params=model.parameters(),
            averager_opts=dict(max_epoch_spread=1),
        )  # fmt: skip


@pytest.mark.parametrize("spread", [-1, 1.5, "1", True, None])
def test_a_wrong_epoch_spread_is_refused_when_the_averager_is_made(spread):
    # (else it came to light only in the averager's process: each round failed, or with -1 nobody ever applied one)
    model = torch.nn.Linear(2, 1)
    with dht_swarm(1) as (dht,), pytest.raises(ValueError, match="max_epoch_spread must be a whole number"):
        TrainingStateAverager(
            dht=dht, prefix="wrong_spread", optimizer=lambda p: torch.optim.SGD(p, lr=0.1), params=model.parameters(),
            max_epoch_spread=spread, start=True,
        )  # fmt: skip
