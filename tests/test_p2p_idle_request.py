"""A stream handler that takes one request is not held by a caller that opens the stream and sends nothing: every
caller sends its request at once, so after FRAME_STALL_TIMEOUT of silence the stream is dropped (real daemons)."""

import asyncio
import time
from typing import AsyncIterator

import pytest

from hivemind.p2p import P2P, P2PContext, framing
from hivemind.proto import test_pb2

pytestmark = pytest.mark.timeout(60)

Request, Response = test_pb2.TestRequest, test_pb2.TestResponse


async def countdown(request: Request, context: P2PContext) -> AsyncIterator[Response]:
    for number in range(request.number, 0, -1):
        yield Response(number=number)


async def test_a_caller_that_never_sends_its_request_is_dropped(pipes_setting, p2p_factory, monkeypatch):
    monkeypatch.setattr(framing, "FRAME_STALL_TIMEOUT", 0.5)
    server = await p2p_factory()
    caller = await p2p_factory(initial_peers=await server.get_visible_maddrs())
    await server.add_protobuf_handler("countdown", countdown, Request, stream_output=True)
    _, reader, writer = await caller.call_binary_stream_handler(server.peer_id, "countdown")
    try:
        started = time.monotonic()
        _, error = await asyncio.wait_for(P2P.receive_protobuf(Response, reader), 20)
        assert "no frame" in error.message
        assert time.monotonic() - started < 15
    finally:
        writer.close()


async def test_a_request_stream_may_still_start_late(pipes_setting, p2p_factory, monkeypatch):
    monkeypatch.setattr(framing, "FRAME_STALL_TIMEOUT", 0.2)
    server = await p2p_factory()
    caller = await p2p_factory(initial_peers=await server.get_visible_maddrs())

    async def total(requests: AsyncIterator[Request], context: P2PContext) -> Response:
        return Response(number=sum([request.number async for request in requests]))

    await server.add_protobuf_handler("total", total, Request, stream_input=True)

    async def late_requests():
        await asyncio.sleep(0.6)
        yield Request(number=5)

    response = await caller.call_protobuf_handler(server.peer_id, "total", late_requests(), Response)
    assert response.number == 5


async def test_a_caller_that_sends_its_request_at_once_is_served(pipes_setting, p2p_factory, monkeypatch):
    monkeypatch.setattr(framing, "FRAME_STALL_TIMEOUT", 0.5)
    server = await p2p_factory()
    caller = await p2p_factory(initial_peers=await server.get_visible_maddrs())
    await server.add_protobuf_handler("countdown", countdown, Request, stream_output=True)
    responses = await caller.iterate_protobuf_handler(server.peer_id, "countdown", Request(number=3), Response)
    assert [response.number async for response in responses] == [3, 2, 1]
