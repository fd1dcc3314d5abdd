"""A peer that waits for another leader's first reply (holding its matchmaking lock for up to request_timeout) answers
a join request that arrives meanwhile within the requester's request_timeout: it refuses it. It used to keep the
request waiting for the lock as long as the requester waits for a reply, so the requester gave up on an honest
leader (counted as silent), or was accepted just as it gave up and left a group that started without it (the
hostile matchmaking test's silent variant: a group of 2 on one side, a failed step on the other, on a loaded
worker)."""

import asyncio
import contextlib
import time

import pytest
from async_wait import wait_until
from averaging_matchmaking_swarm import SCHEMA_HASH, DecentralizedAverager, make_step, swarm_context

from hivemind.proto import averaging_pb2

pytestmark = pytest.mark.timeout(60)

REQUEST_TIMEOUT = 0.5


async def test_a_peer_busy_asking_another_leader_refuses_a_join_request_within_request_timeout():
    async with swarm_context("busy") as swarm:
        leader, follower = await swarm.add_many(
            2, target_group_size=2, min_matchmaking_time=30.0, request_timeout=REQUEST_TIMEOUT
        )
        step = make_step(timeout=30)
        search = asyncio.create_task(leader.matchmaking.look_for_group(step))
        try:
            await wait_until(lambda: leader.matchmaking._declared_expiration is not None, timeout=10)
            request = averaging_pb2.JoinRequest(
                schema_hash=SCHEMA_HASH,
                expiration=leader.matchmaking._declared_expiration + 1.0,
                gather=step.data_for_gather,
                group_key=leader.matchmaking.group_key_manager.current_key,
            )
            stub = DecentralizedAverager.get_stub(follower.p2p, leader.peer_id, namespace="busy")

            async def ask():
                return [reply async for reply in await stub.rpc_join_group(request)]

            async with leader.matchmaking._lock:  # as while it waits for another leader's first reply
                started = time.monotonic()
                try:
                    replies = await asyncio.wait_for(ask(), 2 * REQUEST_TIMEOUT)
                except asyncio.TimeoutError:
                    pytest.fail(f"no reply within {2 * REQUEST_TIMEOUT} s while the peer was busy")
                waited = time.monotonic() - started
            assert [reply.code for reply in replies] == [averaging_pb2.NOT_A_LEADER]
            assert waited < REQUEST_TIMEOUT, f"answered after {waited:.2f} s: the requester had given up"
            await asyncio.sleep(0.5)
            assert not search.done() and not leader.matchmaking._followers  # no group with the refused peer
            # once the lock is free, the same request is accepted (and with target_group_size=2 the group starts)
            replies = await ask()
            assert [reply.code for reply in replies] == [averaging_pb2.ACCEPTED, averaging_pb2.BEGIN_ALLREDUCE]
            group = await asyncio.wait_for(search, 10)
            assert set(group.peer_ids) == {leader.peer_id, follower.peer_id}
        finally:
            search.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await search
