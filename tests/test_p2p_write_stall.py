"""A stream handler's responses must keep moving: a caller that never reads them cannot hold the handler (and every
response it wrote) for as long as it keeps the stream open (real daemons on 127.0.0.1)."""

import asyncio
from typing import AsyncIterator

import pytest

from hivemind.p2p import P2P, P2PContext, framing
from hivemind.p2p.framing import EncodedMessage
from hivemind.p2p.p2p_daemon_bindings.utils import encode_varint
from hivemind.proto import test_pb2

pytestmark = pytest.mark.timeout(60)

Request, Response = test_pb2.TestRequest, test_pb2.TestResponse


def big_response(number: int, nbytes: int) -> EncodedMessage:
    """A TestResponse with ``number`` and an unknown bytes field of ``nbytes`` (parsers skip it)."""
    return EncodedMessage([b"\x08" + encode_varint(number), b"\x12" + encode_varint(nbytes), bytes(nbytes)])


class Flood:
    """Yields 1 MiB responses until it is stopped; records that it was."""

    def __init__(self, count: int = 10**6, nbytes: int = 2**20) -> None:
        self.count, self.nbytes = count, nbytes
        self.stopped = asyncio.Event()

    async def __call__(self, request: Request, context: P2PContext) -> AsyncIterator[EncodedMessage]:
        try:
            for number in range(self.count):
                yield big_response(number, self.nbytes)
        finally:
            self.stopped.set()


async def open_and_never_read(caller: P2P, server: P2P, name: str):
    _, reader, writer = await caller.call_binary_stream_handler(server.peer_id, name)
    await P2P.send_protobuf(Request(number=1), writer)
    await P2P.send_protobuf(P2P.END_OF_STREAM, writer)
    return reader, writer


async def test_handler_is_stopped_when_its_caller_never_reads(pipes_setting, p2p_factory, monkeypatch):
    monkeypatch.setattr(framing, "FRAME_STALL_TIMEOUT", 0.5)
    monkeypatch.setattr(framing, "MIN_FRAME_RATE", 2**30)
    server = await p2p_factory()
    caller = await p2p_factory(initial_peers=await server.get_visible_maddrs())
    flood = Flood()
    await server.add_protobuf_handler("flood", flood, Request, stream_output=True)
    reader, writer = await open_and_never_read(caller, server, "flood")
    try:
        await asyncio.wait_for(flood.stopped.wait(), 30)  # buffers fill within a second, then 0.5 s of stall
    finally:
        writer.close()


async def test_a_caller_that_reads_slowly_but_steadily_gets_every_response(pipes_setting, p2p_factory, monkeypatch):
    monkeypatch.setattr(framing, "FRAME_STALL_TIMEOUT", 0.5)
    monkeypatch.setattr(framing, "MIN_FRAME_RATE", 2**30)
    server = await p2p_factory()
    caller = await p2p_factory(initial_peers=await server.get_visible_maddrs())
    await server.add_protobuf_handler("flood", Flood(count=20, nbytes=2**18), Request, stream_output=True)
    numbers = []
    async for response in await caller.iterate_protobuf_handler(server.peer_id, "flood", Request(), Response):
        numbers.append(response.number)
        await asyncio.sleep(0.02)
    assert numbers == list(range(20))
