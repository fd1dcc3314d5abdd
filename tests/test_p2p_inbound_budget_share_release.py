"""Requests that keep their peer's inbound budget share while they wait for their handler: every way a
stream can end gives the share back, including while its reader waits for the handler to take a request (real
daemons on 127.0.0.1). Each test checks that the peer's share returns to zero, since a share that leaked would have
that peer's large requests refused for good."""

import asyncio
from typing import AsyncIterator

import pytest
from test_p2p_inbound_budget_prefetch import (
    ANNOUNCED,
    HANDLER,
    CountingBudget,
    GatedCounter,
    send_complete_requests,
    start_server,
    wait_until,
)

from hivemind.p2p import P2PContext, framing
from hivemind.p2p.inbound_budget import InboundBudget
from hivemind.proto import runtime_pb2

pytestmark = pytest.mark.timeout(60)

MiB = 1024**2
# a small per-peer share, so that one stream's parked requests fill it: five 1.5 MiB requests fit in 8 MiB, a sixth
# makes the reader wait for its handler to take one
SMALL_MESSAGE = 2 * MiB
SMALL_REQUEST = 1536 * 1024


def small_budget() -> CountingBudget:
    return CountingBudget(per_peer_floor=8 * MiB, per_peer_frames=1)


def request_frame(nbytes: int) -> bytes:
    frame = framing.encode_frame(runtime_pb2.Tensor(buffer=bytes(nbytes - 4)))  # a 3-byte varint length
    assert len(frame) == framing.FRAME_HEADER_LEN + nbytes
    return frame


async def park_until_the_reader_waits(p2p_factory, handler, budget, extra: bytes = framing.END_OF_STREAM_FRAME):
    """Send six SMALL_REQUESTs to a handler that takes none yet: five park, the reader waits with the sixth."""
    server, client = await start_server(p2p_factory, handler, budget, max_message=SMALL_MESSAGE)
    _, reader, writer = await client.call_binary_stream_handler(server.peer_id, HANDLER)
    writer.write(request_frame(SMALL_REQUEST) * 6 + extra)
    await writer.drain()
    await wait_until(lambda: budget.told_to_wait > 0)
    assert budget.held_by(client.peer_id) == 5 * SMALL_REQUEST and not budget.refusals
    return server, client, reader, writer


async def test_share_is_given_back_after_an_unparsable_counted_frame(p2p_factory):
    handler, budget = GatedCounter(), InboundBudget()
    server, client = await start_server(p2p_factory, handler, budget)
    reader, writer = await send_complete_requests(client, server, 2, end=False)
    garbage = b"\xff" * MiB  # an endless varint: not a Tensor
    writer.write(framing.encode_header(framing.MESSAGE_MARKER, len(garbage)) + garbage)
    await writer.drain()
    try:
        await wait_until(lambda: budget.held_by(client.peer_id) == 2 * ANNOUNCED)  # the bad frame is not held
        handler.gate.set()
        response, error = await framing.receive_protobuf(runtime_pb2.Tensor, reader)
        assert response is None and error.message  # the handler got the parse error after its two requests
        await wait_until(lambda: budget.total_held == 0)
    finally:
        writer.close()


async def test_share_is_given_back_after_a_large_error_frame(p2p_factory):
    handler, budget = GatedCounter(), InboundBudget()
    server, client = await start_server(p2p_factory, handler, budget)
    reader, writer = await send_complete_requests(client, server, 2, end=False)
    text = runtime_pb2.Tensor(buffer=bytes(MiB)).SerializeToString()  # an error frame read as the end of the input
    writer.write(framing.encode_header(framing.ERROR_MARKER, len(text)) + text)
    await writer.drain()
    try:
        await wait_until(lambda: budget.held_by(client.peer_id) == 2 * ANNOUNCED)
        handler.gate.set()
        response, error = await framing.receive_protobuf(runtime_pb2.Tensor, reader)
        assert error is None and list(response.size) == [2]
        await wait_until(lambda: budget.total_held == 0)
    finally:
        writer.close()


async def test_reader_waiting_for_its_handler_gives_everything_back_when_the_caller_resets(p2p_factory):
    handler, budget = GatedCounter(), small_budget()
    server, client, _, writer = await park_until_the_reader_waits(p2p_factory, handler, budget, extra=b"")
    writer.write(framing.encode_header(framing.MESSAGE_MARKER, SMALL_REQUEST) + bytes(1000))  # a frame left unfinished
    await writer.drain()
    writer.transport.abort()
    handler.gate.set()  # the handler takes the parked requests, then the reader finds the stream broken
    await wait_until(lambda: budget.total_held == 0)
    assert not budget.refusals


async def test_reader_waiting_for_its_handler_gives_everything_back_when_the_handler_returns(p2p_factory):
    handler, budget = GatedCounter(return_after=1), small_budget()
    server, client, reader, writer = await park_until_the_reader_waits(p2p_factory, handler, budget)
    try:
        handler.gate.set()
        response, error = await asyncio.wait_for(framing.receive_protobuf(runtime_pb2.Tensor, reader), 10)
        assert error is None and list(response.size) == [1]
        await wait_until(lambda: budget.total_held == 0)
    finally:
        writer.close()


async def test_reader_waiting_for_its_handler_gives_everything_back_when_the_server_shuts_down(p2p_factory):
    handler, budget = GatedCounter(), small_budget()
    server, client, reader, writer = await park_until_the_reader_waits(p2p_factory, handler, budget)
    try:
        await asyncio.wait_for(server.shutdown(), 15)
        assert budget.total_held == 0
    finally:
        writer.close()


async def test_share_is_given_back_when_the_handler_is_removed_while_its_streams_wait(p2p_factory):
    handler, budget = GatedCounter(), small_budget()
    server, client, reader, writer = await park_until_the_reader_waits(p2p_factory, handler, budget)
    try:
        await server.remove_protobuf_handler(HANDLER, stream_input=True)
        assert budget.held_by(client.peer_id) == 5 * SMALL_REQUEST  # open streams keep being served
        handler.gate.set()
        response, error = await asyncio.wait_for(framing.receive_protobuf(runtime_pb2.Tensor, reader), 10)
        assert error is None and list(response.size) == [6]
        await wait_until(lambda: budget.total_held == 0)
    finally:
        writer.close()


async def test_reader_waiting_for_its_handler_is_cancelled_with_the_handler(p2p_factory):
    """A handler cancelled by its own code (here: it raises CancelledError) ends the stream and its read task."""
    budget = small_budget()
    gate = asyncio.Event()

    async def cancelled_handler(requests: AsyncIterator[runtime_pb2.Tensor], context: P2PContext):
        await gate.wait()
        raise asyncio.CancelledError()

    server, client, reader, writer = await park_until_the_reader_waits(p2p_factory, cancelled_handler, budget)
    try:
        gate.set()
        await wait_until(lambda: budget.total_held == 0)
    finally:
        writer.close()
