"""The last responses of a handler that returned stay in its stream's write buffer until the caller reads them: a
caller that never does must not hold the stream (its socket, and those bytes) open for as long as it likes; the
stall bound of the frames a handler writes applies to them too (real daemons on 127.0.0.1)."""

import asyncio
import contextlib
from typing import AsyncIterator

import pytest
from test_p2p_write_stall import big_response

from hivemind.p2p import P2P, P2PContext, framing, protobuf_streams
from hivemind.proto import test_pb2

pytestmark = pytest.mark.timeout(60)

Request, Response = test_pb2.TestRequest, test_pb2.TestResponse
RESPONSE_BYTES = 2**18


class RespondsUntilBuffered:
    """Yields responses until some of them wait in the stream's write buffer (the caller's side is full), then returns
    without waiting for them; ``writers`` are the handler streams' writers."""

    def __init__(self) -> None:
        self.writers, self.sent = [], 0
        self.returned = asyncio.Event()

    async def __call__(self, request: Request, context: P2PContext) -> AsyncIterator:
        try:
            for number in range(10**4):
                yield big_response(number, RESPONSE_BYTES)
                self.sent += 1
                if self.writers[-1].transport.get_write_buffer_size() > 0:
                    return
                await asyncio.sleep(0.001)  # let p2pd take what it can
        finally:
            self.returned.set()


@pytest.fixture
def handler(monkeypatch) -> RespondsUntilBuffered:
    handler = RespondsUntilBuffered()
    serve_protobuf_stream = protobuf_streams.serve_protobuf_stream

    async def recording(handler_fn, context, input_type, reader, writer, **kwargs):
        handler.writers.append(writer)
        return await serve_protobuf_stream(handler_fn, context, input_type, reader, writer, **kwargs)

    monkeypatch.setattr(protobuf_streams, "serve_protobuf_stream", recording)
    return handler


async def start_call(server: P2P, caller: P2P, handler: RespondsUntilBuffered):
    await server.add_protobuf_handler("responds", handler, Request, stream_output=True)
    _, reader, writer = await caller.call_binary_stream_handler(server.peer_id, "responds")
    await P2P.send_protobuf(Request(number=1), writer)
    await P2P.send_protobuf(P2P.END_OF_STREAM, writer)
    await asyncio.wait_for(handler.returned.wait(), 20)
    (server_writer,) = handler.writers
    assert server_writer.transport.get_write_buffer_size() > 0
    return reader, writer, server_writer


async def test_a_caller_that_never_reads_the_last_responses_loses_its_stream(
    pipes_setting, p2p_pair, handler, monkeypatch
):
    monkeypatch.setattr(framing, "FRAME_STALL_TIMEOUT", 0.5)
    monkeypatch.setattr(framing, "MIN_FRAME_RATE", 2**30)
    server, caller = p2p_pair
    reader, writer, server_writer = await start_call(server, caller, handler)
    try:
        with contextlib.suppress(ConnectionError):
            await asyncio.wait_for(server_writer.wait_closed(), 10)  # before: open for as long as the caller likes
    finally:
        writer.close()


async def test_a_caller_that_reads_late_still_gets_the_last_responses(pipes_setting, p2p_pair, handler, monkeypatch):
    monkeypatch.setattr(framing, "FRAME_STALL_TIMEOUT", 5.0)
    server, caller = p2p_pair
    reader, writer, server_writer = await start_call(server, caller, handler)
    try:
        await asyncio.sleep(0.2)
        numbers = []
        while True:
            response, error = await asyncio.wait_for(P2P.receive_protobuf(Response, reader), 10)
            if error is not None:
                raise AssertionError(f"unexpected error frame: {error.message}")
            numbers.append(response.number)
            if len(numbers) == handler.sent:
                break
        assert numbers == list(range(handler.sent))
        with contextlib.suppress(asyncio.IncompleteReadError):
            await asyncio.wait_for(reader.readexactly(1), 10)
            raise AssertionError("bytes after the last response")
    finally:
        writer.close()
