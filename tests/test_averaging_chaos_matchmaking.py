"""Found by benchmarks/chaos_averaging.py: a peer that joined a leader's group must not also lead a group of its own
(real p2pd daemons and DHT processes on 127.0.0.1)."""

import asyncio
from typing import List

import pytest
from averaging_matchmaking_swarm import SCHEMA_HASH, DecentralizedAverager, make_step, swarm_context

from hivemind.proto import averaging_pb2
from hivemind.utils.timed_storage import get_dht_time

pytestmark = pytest.mark.timeout(60)

Code = averaging_pb2.MessageCode


async def join(caller, leader_peer) -> List[averaging_pb2.MessageFromLeader]:
    request = averaging_pb2.JoinRequest(
        schema_hash=SCHEMA_HASH, expiration=get_dht_time() + 60, group_key="mm.0b", gather=b"\x93\xc0\x00\xc4\x01\xc0"
    )
    stub = DecentralizedAverager.get_stub(caller.p2p, leader_peer.peer_id, namespace="mm")
    return [message async for message in await stub.rpc_join_group(request)]


async def test_a_peer_that_joined_a_group_accepts_no_followers_until_its_search_ends():
    """F joins L's group. Its search has not quite ended when X asks F to lead it (the chaos run hit this between
    the leader's reply and the end of the search: F logged "Joined a group" and "Formed a group" 1 ms apart, ran
    the all-reduce with its own group, and L waited for F's parts and kept its own values). F must refuse X."""
    async with swarm_context() as swarm:
        leader, follower, caller = await swarm.add_many(3, target_group_size=2)
        window, answered = asyncio.Event(), asyncio.Event()
        end_search = follower.matchmaking._end_search

        async def slow_end_search():  # widens the window that the event loop left open in the chaos run
            window.set()
            await answered.wait()
            await end_search()

        follower.matchmaking._end_search = slow_end_search
        leader_search = asyncio.create_task(leader.matchmaking.look_for_group(make_step(timeout=20)))
        follower_search = asyncio.create_task(
            follower.matchmaking.look_for_group(make_step(timeout=20, scheduled_in=5))  # declares later: L leads
        )
        await asyncio.wait_for(window.wait(), 15)
        try:
            messages = await asyncio.wait_for(join(caller, follower), 10)
        finally:
            answered.set()
        group = await asyncio.wait_for(follower_search, 10)
        assert group == await leader_search and set(group.peer_ids) == {leader.peer_id, follower.peer_id}
        assert [message.code for message in messages] == [Code.NOT_LOOKING_FOR_GROUP]
