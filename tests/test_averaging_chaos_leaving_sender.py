"""Found by benchmarks/chaos_averaging.py: a sender that leaves while its parts wait for the others' must not take
the parts' averages away from the members that remain (real p2pd peers)."""

import asyncio
import os

import pytest
import torch
from allreduce_helpers import (
    call_reducer,
    collect,
    hivemind_logs,
    make_connected_peers,
    make_runner,
    sender_messages,
    start_routers,
)
from async_wait import wait_until

from hivemind.averaging.partition import TensorPartContainer
from hivemind.proto import averaging_pb2

__all__ = ["hivemind_logs"]  # the fixture, used by the tests below

pytestmark = pytest.mark.timeout(60)

SIZE, PART_BYTES = 64, 64  # 4 parts of 16 float32 elements, all reduced by peer A
FRACTIONS = [1.0, 0.0, 0.0]  # B and C only send


async def a_takes_4_of_bs_parts(p2p_factory, size: int):
    """A reduces every part; B streams all its parts. Returns once A took the first 4 of them: the peers, their
    values, the group id, A's runner, the task collecting A's result and B's call."""
    peers = await make_connected_peers(p2p_factory, 3)
    routers = await start_routers(peers)
    values = [torch.randn(size) for _ in range(3)]
    group_id = os.urandom(20)
    runner = make_runner(
        peers[0], routers[0], peers, group_id, [values[0]], peer_fractions=FRACTIONS, part_size_bytes=PART_BYTES,
        sender_timeout=5.0, reducer_timeout=10.0,
    )  # fmt: skip
    container_b = TensorPartContainer([values[1]], FRACTIONS, part_size_bytes=PART_BYTES)
    result = asyncio.create_task(collect(runner))
    call_b = asyncio.create_task(call_reducer(peers[1], peers[0], sender_messages(container_b, 0, group_id)))
    await wait_until(lambda: runner.reducer.sender_progress[1] == 4, "B's first 4 parts to be taken")
    return peers, values, group_id, runner, result, call_b


async def b_leaves_then_c_sends(p2p_factory, size: int):
    """A reduces every part; B streams all its parts and leaves once 4 of them were taken (its stream is closed, its
    handler cancelled), then C sends. Returns A's runner, the three peers' values, A's result and C's reply codes."""
    peers, values, group_id, runner, result, call_b = await a_takes_4_of_bs_parts(p2p_factory, size)
    call_b.cancel()  # B leaves: its stream is closed while its handler waits
    await asyncio.gather(call_b, return_exceptions=True)
    await wait_until(lambda: not runner._handler_tasks, "B's handler to end")

    container_c = TensorPartContainer([values[2]], FRACTIONS, part_size_bytes=PART_BYTES)
    replies_c = await asyncio.wait_for(call_reducer(peers[2], peers[0], sender_messages(container_c, 0, group_id)), 10)
    averaged = values[0] + (await asyncio.wait_for(result, 10))[0]
    return runner, values, averaged, [reply.code for reply in replies_c]


async def test_a_sender_that_leaves_while_waiting_for_averages_does_not_stall_the_others(p2p_factory):
    """B streams all its parts and closes its stream (its averager was shut down) while they wait for C's parts.
    Each part's average is one future shared by everyone waiting for it (A's own parts among them): cancelling B's
    handler used to cancel it for all of them, so A's round never finished and C got no replies (in the chaos run a
    survivor waited for the all-reduce timeout, then failed its step)."""
    _, values, averaged, codes_c = await b_leaves_then_c_sends(p2p_factory, SIZE)
    torch.testing.assert_close(averaged, sum(values) / 3, rtol=0, atol=1e-6)
    assert codes_c == [averaging_pb2.AVERAGED_PART] * 4


async def test_a_sender_that_leaves_with_parts_still_queued_is_excluded_from_them(p2p_factory):
    """B streams all its parts and closes its stream while the last ones still wait, unread, for the reducer's window
    (it holds 4 parts ahead of the oldest unfinished one). Its handler is cancelled then: B used to stay a sender that
    never delivers, so the reducer waited for its last parts until the all-reduce timeout. Now B is excluded from the
    parts it did not deliver, and the round finishes with the others."""
    size = 96  # 6 parts of 16 elements, all reduced by A; B's parts 4 and 5 were sent but wait for the window
    runner, values, averaged, codes_c = await b_leaves_then_c_sends(p2p_factory, size)
    delivered, undelivered = slice(0, 64), slice(64, size)
    torch.testing.assert_close(averaged[delivered], sum(v[delivered] for v in values) / 3, rtol=0, atol=1e-6)
    torch.testing.assert_close(averaged[undelivered], (values[0] + values[2])[undelivered] / 2, rtol=0, atol=1e-6)
    assert codes_c == [averaging_pb2.AVERAGED_PART] * 6
    assert "closed its stream" in runner.reducer.banned_reasons[1]


async def test_a_round_cancelled_here_does_not_blame_its_senders(p2p_factory, hivemind_logs):
    """When this peer's own round is cancelled (its averager shuts down), the senders waiting on it did nothing
    wrong: no "excluded sender" warning names them (the chaos run's killed peers logged one for an honest sender)."""
    # 6 parts: B's last 2 wait for the reduce window
    _, _, _, runner, result, call_b = await a_takes_4_of_bs_parts(p2p_factory, 96)
    result.cancel()  # our own round ends (the averager's shutdown cancels it) while B waits for the averages
    await asyncio.gather(result, call_b, return_exceptions=True)
    await wait_until(lambda: not runner._handler_tasks, "B's handler to end")

    assert not any("excluded sender" in record.getMessage() for record in hivemind_logs.records)
