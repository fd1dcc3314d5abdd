"""A peer that starts large request frames on many streams and leaves them unfinished: the receiving P2P holds at
most its per-peer budget of them, refuses the next stream with an error naming the limit, and serves other peers
meanwhile (real daemons on 127.0.0.1)."""

import asyncio
from typing import AsyncIterator, List

import pytest

from hivemind.p2p import P2P, P2PContext, framing
from hivemind.proto import runtime_pb2

pytestmark = pytest.mark.timeout(60)

MiB = 1024**2
HANDLER = "collect"
MAX_MESSAGE = 5 * MiB  # like an averager's all-reduce parts
ANNOUNCED = 4_500_000  # per frame; 14 of them fit the 64 MiB per-peer floor, the 15th does not
ADMITTED = 64 * MiB // ANNOUNCED


async def collect(requests: AsyncIterator[runtime_pb2.Tensor], context: P2PContext) -> runtime_pb2.Tensor:
    total = 0
    async for request in requests:
        total += len(request.buffer)
    return runtime_pb2.Tensor(size=[total])


async def start_half_sent_frames(attacker: P2P, server: P2P, count: int) -> List[tuple]:
    """Open ``count`` raw streams, each with a frame announcing ANNOUNCED bytes of which only 1 MiB is sent."""

    async def one():
        _, reader, writer = await attacker.call_binary_stream_handler(server.peer_id, HANDLER)
        writer.write(framing.encode_header(framing.MESSAGE_MARKER, ANNOUNCED) + bytes(MiB))
        await writer.drain()
        return reader, writer

    return await asyncio.gather(*(one() for _ in range(count)))


async def wait_until(condition, timeout: float = 10.0) -> None:
    """Poll a condition of the server's bookkeeping (it changes inside p2pd-driven callbacks, not on our events)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def test_unfinished_frames_past_the_peer_budget_are_refused_while_other_peers_are_served(p2p_factory):
    server = await p2p_factory()
    await server.add_protobuf_handler(
        HANDLER, collect, runtime_pb2.Tensor, stream_input=True, max_message_size=MAX_MESSAGE
    )
    maddrs = await server.get_visible_maddrs()
    attacker, honest = [await p2p_factory(initial_peers=maddrs) for _ in range(2)]
    for peer in (attacker, honest):
        await peer.wait_for_at_least_n_peers(1, attempts=100, delay=0.05)

    streams = await start_half_sent_frames(attacker, server, ADMITTED + 1)
    try:
        reads = {asyncio.create_task(framing.receive_protobuf(runtime_pb2.Tensor, reader)) for reader, _ in streams}
        done, pending = await asyncio.wait(reads, timeout=10, return_when=asyncio.FIRST_COMPLETED)
        assert len(done) == 1, "no stream was refused although the peer exceeded its budget"
        response, error = done.pop().result()
        assert response is None and f"{64 * MiB} bytes allowed per peer" in error.message
        assert server.inbound_budget.held_by(attacker.peer_id) == ADMITTED * ANNOUNCED

        # another peer's stream (a full-size message) goes through while the attacker's frames are held
        message = runtime_pb2.Tensor(buffer=bytes(ANNOUNCED - 64))

        async def one_message():
            yield message

        answer = await asyncio.wait_for(
            honest.call_protobuf_handler(server.peer_id, HANDLER, one_message(), runtime_pb2.Tensor), timeout=10
        )
        assert list(answer.size) == [ANNOUNCED - 64]
        for read in pending:
            read.cancel()
    finally:
        for _, writer in streams:
            writer.close()
    # the unfinished frames fail with their streams: the budget is given back
    await wait_until(lambda: server.inbound_budget.total_held == 0)
