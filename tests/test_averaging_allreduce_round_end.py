"""A round ends within its allreduce_timeout even when a sender keeps its stream open after its last part (frozen
after sending, or hostile): the reducer's wait for its replies to go out and for that stream to end is cut at the
round's last call, instead of running past the deadline and failing the whole step (real p2pd peers on 127.0.0.1)."""

import asyncio
import os

import pytest
import torch
from allreduce_helpers import call_reducer, collect, make_connected_peers, make_runner, sender_messages, start_routers

from hivemind.averaging.partition import TensorPartContainer

pytestmark = pytest.mark.timeout(60)

SIZE, PART_BYTES = 64, 64  # 4 parts of 16 float32 elements, all reduced by the honest member
FRACTIONS = [1.0, 0.0]  # the other member only sends
ALLREDUCE_TIMEOUT = 8.0
TIMEOUTS = dict(sender_timeout=3.0, reducer_timeout=6.0, allreduce_timeout=ALLREDUCE_TIMEOUT)


async def test_a_sender_that_keeps_its_stream_open_after_its_last_part_does_not_fail_the_round(p2p_factory):
    peers = await make_connected_peers(p2p_factory, 2)
    routers = await start_routers(peers)
    own, other = torch.full((SIZE,), 2.0), torch.full((SIZE,), 4.0)
    group_id = os.urandom(20)
    runner = make_runner(
        peers[0], routers[0], peers, group_id, [own], peer_fractions=FRACTIONS, part_size_bytes=PART_BYTES, **TIMEOUTS
    )
    container = TensorPartContainer([other], FRACTIONS, part_size_bytes=PART_BYTES)
    loop = asyncio.get_running_loop()
    started, never = loop.time(), asyncio.Event()

    async def parts_then_silence():
        # one part every 2 s (well within sender_timeout), the last one at 75% of the round
        for k, message in enumerate(sender_messages(container, 0, group_id)):
            await asyncio.sleep(max(0.0, started + k * 0.25 * ALLREDUCE_TIMEOUT - loop.time()))
            yield message
        await never.wait()  # the stream stays open

    sending = asyncio.create_task(call_reducer(peers[1], peers[0], parts_then_silence()))
    try:
        # as the averager does: the round's deltas must be in within allreduce_timeout, or the step fails
        (delta,) = await asyncio.wait_for(collect(runner), ALLREDUCE_TIMEOUT)
    finally:
        sending.cancel()
        await asyncio.gather(sending, return_exceptions=True)
    assert torch.equal(own + delta, torch.full((SIZE,), 3.0))
