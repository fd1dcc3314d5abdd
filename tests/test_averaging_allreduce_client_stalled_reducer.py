"""A sender with no share of its own (a client) gets its replies only once the reducer has averaged all its parts,
so it allows a reducer more than one reducer_timeout for the first reply; but only once every part is sent. While
its parts still wait to be sent, a reducer that takes none for reducer_timeout (frozen, or not reading its stream)
has failed: before, the client waited one reducer_timeout per window of parts (a frozen reducer of 62 parts cost a
client 39 s where the others took 10 s) (real p2pd peers on 127.0.0.1)."""

import asyncio
import os
import time
from typing import AsyncIterator

import pytest
import torch
from allreduce_helpers import PREFIX, collect, make_connected_peers, make_runner, start_routers

from hivemind.p2p import P2PContext, ServicerBase
from hivemind.proto import averaging_pb2

pytestmark = pytest.mark.timeout(90)

Part = averaging_pb2.AveragingData
SIZE = 2**23  # 32 MiB, all of it sent to the stalled reducer: 64 parts of 512 KiB, more than the streams buffer
REDUCER_TIMEOUT = 1.0


class _StalledReducer(ServicerBase):
    """Accepts the stream and never reads from it."""

    async def rpc_aggregate_part(self, parts: AsyncIterator[Part], _: P2PContext) -> AsyncIterator[Part]:
        await asyncio.Event().wait()
        yield  # (a stream handler)


_StalledReducer.__name__ = "AllreduceRouter"  # served under the name the client calls


async def test_a_client_gives_up_on_a_reducer_that_takes_none_of_its_parts_within_one_reducer_timeout(p2p_factory):
    peers = await make_connected_peers(p2p_factory, 2)
    routers = await start_routers(peers[:1])
    await _StalledReducer().add_p2p_handlers(peers[1], namespace=PREFIX)
    values = torch.full((SIZE,), 5.0)
    runner = make_runner(
        peers[0], routers[0], peers, os.urandom(20), [values], peer_fractions=[0.0, 1.0],
        sender_timeout=REDUCER_TIMEOUT / 2, reducer_timeout=REDUCER_TIMEOUT,
    )  # fmt: skip
    started = time.monotonic()
    (delta,) = await asyncio.wait_for(collect(runner), 60)
    assert time.monotonic() - started < 10 * REDUCER_TIMEOUT  # 16 windows of 4 parts: 16 s before
    assert torch.equal(delta, torch.zeros(SIZE))  # every part keeps its local value
