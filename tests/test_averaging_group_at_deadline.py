"""A leader whose declared time ends exactly at its step's deadline (its matchmaking time reaches past the timeout)
starts the group it gathered by then: it used to give up at the deadline first, disband a group that was large
enough, and fail with 'could not find a group'."""

import time

import pytest
import torch

from hivemind.utils.timed_storage import get_dht_time
from tests.averager_helpers import averagers_on, dht_swarm


@pytest.mark.timeout(40)
def test_a_leader_whose_declaration_ends_at_its_deadline_starts_its_group():
    tensors = [[torch.zeros(8)], [torch.full((8,), 2.0)]]
    # the leader's matchmaking time (3 s) outlasts its timeout (2 s): it declares itself until its deadline
    options = dict(min_matchmaking_time=[3.0, 1.0], request_timeout=0.5)
    with dht_swarm(2) as dhts, averagers_on(dhts, tensors, **options) as (leader, follower):
        now = get_dht_time()
        leader_control = leader.step(wait=False, scheduled_time=now + 0.5, timeout=2.0)
        time.sleep(0.3)  # the follower declares a later time, so it asks the leader to lead it
        follower_control = follower.step(wait=False, scheduled_time=now + 4.0, timeout=10.0)
        assert len(leader_control.result(timeout=15)) == 2
        assert len(follower_control.result(timeout=15)) == 2
        for averager in (leader, follower):
            with averager.get_tensors() as (tensor,):
                assert torch.allclose(tensor, torch.ones(8))
