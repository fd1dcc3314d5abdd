"""Peers that fall behind (paused) or join late catch up with the swarm's epoch and parameters inside .step()."""

import time

import pytest
import torch

from hivemind.dht import DHT
from hivemind.optim.optimizer import Optimizer

FAST_TRACKER = dict(min_refresh_period=0.05, max_refresh_period=0.3, default_refresh_period=0.1)


@pytest.fixture(scope="module")
def dht_pair():
    first = DHT(start=True)
    second = DHT(initial_peers=first.get_visible_maddrs(), start=True)
    yield first, second
    second.shutdown()
    first.shutdown()


def make_optimizer(dht: DHT, model: torch.nn.Module, run_id: str) -> Optimizer:
    return Optimizer(
        dht=dht, run_id=run_id, target_batch_size=8, batch_size_per_step=4,
        optimizer=lambda params: torch.optim.Adam(params, lr=0.05), params=model.parameters(),
        matchmaking_time=0.5, averaging_timeout=2.0, load_state_timeout=20.0, tracker_opts=FAST_TRACKER,
        averager_opts=dict(request_timeout=0.3),
    )  # fmt: skip


def train_step(model: torch.nn.Module, opt: Optimizer) -> None:
    x = torch.randn(4, 8)
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(x), x.sum(dim=1, keepdim=True)).backward()
    opt.step()


def assert_caught_up(laggard_model, laggard, leader_model, leader, max_steps=20):
    """The laggard reaches the leader's epoch (the leader is not stepping meanwhile) and its exact parameters."""
    for _ in range(max_steps):
        train_step(laggard_model, laggard)
        if laggard.local_epoch == leader.local_epoch:
            break
        time.sleep(0.05)
    assert laggard.local_epoch == leader.local_epoch
    for mine, theirs in zip(laggard_model.parameters(), leader_model.parameters()):
        assert torch.equal(mine, theirs)
    assert laggard.state_dict()["state"]["local_epoch"] == leader.local_epoch


@pytest.mark.timeout(90)
def test_a_paused_peer_resynchronizes_its_epoch_and_parameters_when_it_resumes(dht_pair):
    torch.manual_seed(0)
    models = [torch.nn.Linear(8, 1), torch.nn.Linear(8, 1)]
    models[1].load_state_dict(models[0].state_dict())
    leader, laggard = (make_optimizer(dht, model, "resync_paused") for dht, model in zip(dht_pair, models))
    try:
        deadline = time.monotonic() + 20
        while not all(opt.tracker.global_progress.num_peers == 2 for opt in (leader, laggard)):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        train_step(models[1], laggard)  # the laggard made some progress, then pauses
        while leader.local_epoch < 3:  # the laggard's averagers never join: each epoch falls back to local grads
            train_step(models[0], leader)
        assert laggard.local_epoch == 0
        assert_caught_up(models[1], laggard, models[0], leader)
    finally:
        leader.shutdown()
        laggard.shutdown()


@pytest.mark.timeout(90)
def test_a_peer_joining_mid_training_catches_up_inside_step_without_being_told(dht_pair):
    torch.manual_seed(1)
    models = [torch.nn.Linear(8, 1), torch.nn.Linear(8, 1)]
    leader = make_optimizer(dht_pair[0], models[0], "resync_join")
    newcomer = None
    try:
        while leader.local_epoch < 3:
            train_step(models[0], leader)
        newcomer = make_optimizer(dht_pair[1], models[1], "resync_join")
        assert_caught_up(models[1], newcomer, models[0], leader)
    finally:
        leader.shutdown()
        if newcomer is not None:
            newcomer.shutdown()


@pytest.mark.timeout(90)
def test_a_peer_whose_view_of_the_swarm_was_stale_loads_the_state_at_its_epoch_update_instead_of_jumping(dht_pair):
    torch.manual_seed(2)
    models = [torch.nn.Linear(8, 1), torch.nn.Linear(8, 1)]
    models[1].load_state_dict(models[0].state_dict())
    leader, laggard = (make_optimizer(dht, model, "resync_stale") for dht, model in zip(dht_pair, models))
    try:
        deadline = time.monotonic() + 20
        while not all(opt.tracker.global_progress.num_peers == 2 for opt in (leader, laggard)):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        train_step(models[1], laggard)  # local gradients that a jump ahead would apply
        while leader.local_epoch < 3:
            train_step(models[0], leader)
        while laggard.tracker.global_epoch < 3:
            assert time.monotonic() < deadline + 60
            time.sleep(0.02)
        # the epoch update that .step() starts when its check ran on a stale view (global epoch 0) and the refresh
        # just before the update brought the swarm's epoch 3: the laggard must load, not step itself to epoch 3
        laggard._update_global_epoch(grad_scaler=None)
        assert laggard.local_epoch == leader.local_epoch == 3
        for mine, theirs in zip(models[1].parameters(), models[0].parameters()):
            assert torch.equal(mine, theirs)
    finally:
        leader.shutdown()
        laggard.shutdown()
