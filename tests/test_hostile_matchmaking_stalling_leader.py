"""A hostile peer that keeps declaring itself under a group key just ahead of the honest peers, and then
stalls every join request, must not keep the honest peers from forming their group (real DHTs and p2pd)."""

import asyncio
import contextlib
import time
from typing import AsyncIterator, Optional

import pytest
from averaging_matchmaking_swarm import DecentralizedAverager, groups_of, look_for_groups, make_step, swarm_context

from hivemind.averaging.group_info import GroupInfo
from hivemind.averaging.key_manager import GroupKeyManager
from hivemind.p2p import P2PContext
from hivemind.proto import averaging_pb2
from hivemind.utils.timed_storage import get_dht_time

pytestmark = pytest.mark.timeout(60)

Code = averaging_pb2.MessageCode


class HostileLeader(DecentralizedAverager):
    """Answers a join request with ACCEPTED (unless ``accept`` is False) and then never again; or, given the
    followers' ``request_timeout``, keeps a follower waiting until just before it would give up, then disbands the
    group and suggests itself."""

    def __init__(self, accept: bool = True, follower_request_timeout: Optional[float] = None):
        super().__init__(None)
        self.accept, self.follower_request_timeout = accept, follower_request_timeout
        self.requests = 0

    async def rpc_join_group(
        self, request: averaging_pb2.JoinRequest, context: P2PContext
    ) -> AsyncIterator[averaging_pb2.MessageFromLeader]:
        self.requests += 1
        if self.accept:
            yield averaging_pb2.MessageFromLeader(code=Code.ACCEPTED)
        if self.follower_request_timeout is None:
            await asyncio.Event().wait()
        await asyncio.sleep(max(0.0, request.expiration - get_dht_time()) + self.follower_request_timeout * 0.6)
        yield averaging_pb2.MessageFromLeader(code=Code.GROUP_DISBANDED, suggested_leader=context.local_id.to_bytes())


HostileLeader.__name__ = "DecentralizedAverager"  # served under the averager's handler names


async def _keep_declaring_first(key_manager: GroupKeyManager, key: str, hostile_peer, honest_ids) -> None:
    """Re-declare the hostile peer just before the earliest honest declaration, with a new expiration each time, so
    that every honest poll sees a declaration it has not tried yet and that orders before its own."""
    while True:
        honest = [exp for peer, exp in await key_manager.get_averagers(key, only_active=True) if peer in honest_ids]
        expiration = min(honest, default=get_dht_time() + 1.0) - 0.05
        await key_manager.declare_averager(key, hostile_peer, max(expiration, get_dht_time() + 0.3))
        await asyncio.sleep(0.2)


async def _start_declaring_first(key_manager: GroupKeyManager, key: str, hostile_peer, honest_ids) -> asyncio.Task:
    """Declare the hostile peer once before the honest peers search (their declarations, made later and at least
    min_matchmaking_time ahead, order after it), then keep re-declaring it. Without the first one, a loaded machine
    let the honest peers find each other before the hostile peer's first declaration was stored: no attack."""
    await key_manager.declare_averager(key, hostile_peer, get_dht_time() + 0.95)
    return asyncio.create_task(_keep_declaring_first(key_manager, key, hostile_peer, honest_ids))


@pytest.mark.parametrize("accept", [False, True], ids=["silent", "accepts-then-stalls"])
async def test_a_leader_that_keeps_stalling_cannot_keep_honest_peers_from_grouping(accept):
    async with swarm_context("stall") as swarm:
        first, second = await swarm.add_many(2, target_group_size=2, min_matchmaking_time=1.0, request_timeout=0.5)
        hostile = await swarm.add(serve=False)
        leader = HostileLeader(accept)
        await leader.add_p2p_handlers(hostile.p2p, namespace="stall")
        key_manager = hostile.matchmaking.group_key_manager
        honest_ids = {first.peer_id, second.peer_id}
        declaring = await _start_declaring_first(key_manager, "stall.0b", hostile.peer_id, honest_ids)
        try:
            started = time.monotonic()
            results = await look_for_groups([first, second], [make_step(timeout=12), make_step(timeout=12)])
            elapsed = time.monotonic() - started
        finally:
            declaring.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await declaring
        assert leader.requests > 0, "the hostile leader was never asked: the attack did not happen"
        assert all(isinstance(result, GroupInfo) for result in results), results
        (group,) = groups_of(results)
        assert set(group.peer_ids) == honest_ids
        print(f"grouped after {elapsed:.1f} s, {leader.requests} requests to the hostile leader")


async def test_a_leader_that_keeps_disbanding_and_suggesting_itself_cannot_keep_honest_peers_from_grouping():
    async with swarm_context("stall") as swarm:
        first, second = await swarm.add_many(2, target_group_size=2, min_matchmaking_time=1.0, request_timeout=0.5)
        hostile = await swarm.add(serve=False)
        leader = HostileLeader(follower_request_timeout=0.5)
        await leader.add_p2p_handlers(hostile.p2p, namespace="stall")
        key_manager = hostile.matchmaking.group_key_manager
        honest_ids = {first.peer_id, second.peer_id}
        declaring = await _start_declaring_first(key_manager, "stall.0b", hostile.peer_id, honest_ids)
        try:
            started = time.monotonic()
            results = await look_for_groups([first, second], [make_step(timeout=10), make_step(timeout=10)])
            print(f"after {time.monotonic() - started:.1f} s: {leader.requests} requests to the hostile leader")
        finally:
            declaring.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await declaring
        assert leader.requests > 0, "the hostile leader was never asked: the attack did not happen"
        assert all(isinstance(result, GroupInfo) for result in results), results
        (group,) = groups_of(results)
        assert set(group.peer_ids) == honest_ids
