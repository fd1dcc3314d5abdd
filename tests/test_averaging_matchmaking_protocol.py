"""The join protocol seen from the wire: the leader's reply codes, and a follower facing leaders that stall,
redirect it or send a malformed group (real p2pd daemons and DHT processes on 127.0.0.1)."""

import asyncio
import math
from typing import AsyncIterator, List

import pytest
from averaging_matchmaking_swarm import SCHEMA_HASH, DecentralizedAverager, make_step, swarm_context

from hivemind.averaging.matchmaking import MatchmakingException
from hivemind.averaging.matchmaking_rules import MAX_GATHER_BYTES
from hivemind.p2p import P2PContext, ServicerBase
from hivemind.proto import averaging_pb2
from hivemind.utils.timed_storage import get_dht_time

Code = averaging_pb2.MessageCode


class ScriptedLeader(ServicerBase):
    """Answers every join request with a script: messages to send, and awaitables to wait for in between."""

    def __init__(self, script: list):
        self.script, self.requests = script, []
        self.requested = asyncio.Event()

    async def rpc_join_group(
        self, request: averaging_pb2.JoinRequest, context: P2PContext
    ) -> AsyncIterator[averaging_pb2.MessageFromLeader]:
        self.requests.append((context.remote_id, request))
        self.requested.set()
        for item in self.script:
            if isinstance(item, averaging_pb2.MessageFromLeader):
                yield item
            else:
                await item


ScriptedLeader.__name__ = "DecentralizedAverager"  # served under the averager's handler names


async def start_scripted_leader(swarm, script: list, expires_in: float) -> ScriptedLeader:
    """A peer that declared itself under mm.0b (expiring in ``expires_in`` s) and answers with ``script``."""
    peer = await swarm.add(serve=False)
    leader = ScriptedLeader(script)
    await leader.add_p2p_handlers(peer.p2p, namespace="mm")
    key_manager = peer.matchmaking.group_key_manager
    assert await key_manager.declare_averager("mm.0b", peer.peer_id, get_dht_time() + expires_in)
    leader.peer = peer
    return leader


async def join(caller, leader_peer, **fields) -> List[averaging_pb2.MessageFromLeader]:
    request = dict(
        schema_hash=SCHEMA_HASH, expiration=get_dht_time() + 60, group_key="mm.0b", gather=b"\x93\xc0\x00\xc4\x01\xc0"
    )
    request.update(fields)
    stub = DecentralizedAverager.get_stub(caller.p2p, leader_peer.peer_id, namespace="mm")
    stream = await stub.rpc_join_group(averaging_pb2.JoinRequest(**request))
    return [message async for message in stream]


async def wait_until_declared(peer) -> float:
    key_manager = peer.matchmaking.group_key_manager
    while True:
        declared = dict(await key_manager.get_averagers(key_manager.current_key, only_active=True))
        if peer.peer_id in declared:
            return declared[peer.peer_id]
        await asyncio.sleep(0.05)


@pytest.mark.timeout(60)
async def test_leader_reply_codes():
    async with swarm_context() as swarm:
        leader, caller, other = await swarm.add_many(3, min_matchmaking_time=30.0)
        codes = lambda messages: [message.code for message in messages]  # noqa: E731
        assert codes(await join(caller, leader)) == [Code.NOT_LOOKING_FOR_GROUP]

        search = asyncio.create_task(leader.matchmaking.look_for_group(make_step(timeout=60)))
        expiration = await wait_until_declared(leader)
        assert codes(await join(caller, leader, schema_hash=b"")) == [Code.PROTOCOL_VIOLATION]
        assert codes(await join(caller, leader, expiration=math.inf)) == [Code.PROTOCOL_VIOLATION]
        assert codes(await join(caller, leader, gather=b"x" * (2**18 + 1))) == [Code.PROTOCOL_VIOLATION]
        assert codes(await join(caller, leader, schema_hash=b"other")) == [Code.BAD_SCHEMA_HASH]
        assert codes(await join(caller, leader, group_key="mm.0b1")) == [Code.BAD_GROUP_KEY]
        assert codes(await join(caller, leader, expiration=expiration - 1)) == [Code.BAD_EXPIRATION_TIME]

        accepted = asyncio.create_task(join(caller, leader, expiration=expiration))
        while not leader.matchmaking._followers:
            await asyncio.sleep(0.01)
        assert codes(await join(caller, leader)) == [Code.DUPLICATE_PEER_ID]
        assert not accepted.done()
        search.cancel()  # the leader leaves: its follower learns that the group is disbanded
        assert codes(await accepted) == [Code.ACCEPTED, Code.GROUP_DISBANDED]
        with pytest.raises(asyncio.CancelledError):
            await search
        assert codes(await join(other, leader)) == [Code.NOT_LOOKING_FOR_GROUP]


async def test_group_is_full_at_target_size():
    async with swarm_context() as swarm:
        leader, first, second = await swarm.add_many(3, target_group_size=2, min_matchmaking_time=30.0)
        search = asyncio.create_task(leader.matchmaking.look_for_group(make_step(timeout=60)))
        await wait_until_declared(leader)
        messages = await join(first, leader)
        assert [message.code for message in messages] == [Code.ACCEPTED, Code.BEGIN_ALLREDUCE]
        group = await search
        assert set(group.peer_ids) == {leader.peer_id, first.peer_id}
        assert [PeerIDs for PeerIDs in messages[1].ordered_peer_ids] == [p.to_bytes() for p in group.peer_ids]
        assert [message.code for message in await join(second, leader)] == [Code.NOT_LOOKING_FOR_GROUP]


async def test_follower_reports_a_leader_that_never_starts_the_group():
    async with swarm_context() as swarm:
        # the follower starts first: its start-up on a loaded machine must not outlast the leader's short declaration
        follower = await swarm.add()
        stall = asyncio.Event()  # never set: the leader accepts and then says nothing
        leader = await start_scripted_leader(
            swarm, [averaging_pb2.MessageFromLeader(code=Code.ACCEPTED), stall.wait()], 0.8
        )
        with pytest.raises(MatchmakingException, match=r"timed out waiting for the leader 1 time\(s\)"):
            await follower.matchmaking.look_for_group(make_step(timeout=2.5))
        assert len(leader.requests) == 1


async def test_follower_refuses_a_malformed_group():
    async with swarm_context() as swarm:
        follower = await swarm.add()
        bad_group = averaging_pb2.MessageFromLeader(
            code=Code.BEGIN_ALLREDUCE, group_id=b"g" * 20, ordered_peer_ids=[b"\x01" * 34], gathered=[b""]
        )
        accepted = averaging_pb2.MessageFromLeader(code=Code.ACCEPTED)
        leader = await start_scripted_leader(swarm, [accepted, bad_group], 0.8)
        with pytest.raises(MatchmakingException, match="malformed group from"):
            await follower.matchmaking.look_for_group(make_step(timeout=2))
        assert len(leader.requests) == 1


@pytest.mark.timeout(60)
async def test_disbanded_follower_asks_the_suggested_leader_at_once():
    async with swarm_context() as swarm:
        real_leader = await swarm.add(min_matchmaking_time=1.0)
        follower = await swarm.add(min_matchmaking_time=1.0)
        follower.matchmaking.poll_period = 60  # the follower reads the DHT only once: it can only learn by redirect
        redirect_now = asyncio.Event()
        disband = averaging_pb2.MessageFromLeader(
            code=Code.GROUP_DISBANDED, suggested_leader=real_leader.peer_id.to_bytes()
        )
        script = [averaging_pb2.MessageFromLeader(code=Code.ACCEPTED), redirect_now.wait(), disband]
        fake = await start_scripted_leader(swarm, script, expires_in=14)

        follower_search = asyncio.create_task(
            follower.matchmaking.look_for_group(make_step(timeout=30, scheduled_in=15))
        )
        await fake.requested.wait()  # the follower has read the DHT (no real leader yet) and joined the fake
        leader_search = asyncio.create_task(real_leader.matchmaking.look_for_group(make_step(timeout=15)))
        await wait_until_declared(real_leader)
        redirect_now.set()
        group = await asyncio.wait_for(follower_search, 5)  # long before the follower's own declared time
        assert group == await leader_search
        assert set(group.peer_ids) == {real_leader.peer_id, follower.peer_id}


async def test_follower_accepted_elsewhere_redirects_its_own_followers():
    async with swarm_context() as swarm:
        leader, middle, caller = await swarm.add_many(3)
        middle_search = asyncio.create_task(middle.matchmaking.look_for_group(make_step(timeout=20, scheduled_in=4)))
        middle_expiration = await wait_until_declared(middle)
        joined = asyncio.create_task(join(caller, middle, expiration=middle_expiration))
        while not middle.matchmaking._followers:
            await asyncio.sleep(0.01)
        leader_search = asyncio.create_task(leader.matchmaking.look_for_group(make_step(timeout=20)))

        # middle finds the better-ordered leader, is accepted, and sends its follower there
        messages = await asyncio.wait_for(joined, 10)
        assert [message.code for message in messages] == [Code.ACCEPTED, Code.GROUP_DISBANDED]
        assert messages[1].suggested_leader == leader.peer_id.to_bytes()
        group = await middle_search
        assert group == await leader_search and set(group.peer_ids) == {leader.peer_id, middle.peer_id}


async def test_oversized_gather_is_refused_before_searching():
    async with swarm_context() as swarm:
        (peer,) = await swarm.add_many(1)
        step = make_step(timeout=5)
        step.data_for_gather = b"x" * (MAX_GATHER_BYTES + 1)
        with pytest.raises(ValueError, match="gather payload"):
            await peer.matchmaking.look_for_group(step)
        assert not peer.matchmaking.is_looking_for_group


@pytest.mark.timeout(60)
async def test_moving_the_scheduled_time_earlier_redeclares():
    async with swarm_context() as swarm:
        peers = await swarm.add_many(2)
        steps = [make_step(timeout=40, scheduled_in=30) for _ in peers]
        searches = [asyncio.create_task(peer.matchmaking.look_for_group(step)) for peer, step in zip(peers, steps)]
        first_expirations = [await wait_until_declared(peer) for peer in peers]
        for step in steps:
            step.scheduled_time = get_dht_time()  # e.g. the optimizer decided to average now
        groups = await asyncio.wait_for(asyncio.gather(*searches), 10)  # long before the first declared times
        assert groups[0] == groups[1] and groups[0].group_size == 2
        assert all(get_dht_time() < expiration - 15 for expiration in first_expirations)
