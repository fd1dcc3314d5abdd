"""Matchmaking between real peers (DHT processes and p2pd daemons on 127.0.0.1): groups form as the protocol says."""

import pytest

from averaging_matchmaking_swarm import assert_consistent, groups_of, look_for_groups, make_step, swarm_context
from hivemind.averaging.group_info import GroupInfo


async def test_two_peers_form_a_group():
    async with swarm_context() as swarm:
        peers = await swarm.add_many(2)
        results = await look_for_groups(peers, [make_step(gather=i) for i in range(2)])
        assert all(isinstance(result, GroupInfo) for result in results), results
        assert results[0] == results[1]
        assert set(results[0].peer_ids) == {peer.peer_id for peer in peers}
        assert len(results[0].group_id) == 20
        assert_consistent(peers, results)
