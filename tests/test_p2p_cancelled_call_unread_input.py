"""A stream call that its caller gives up (a timeout, or closing the response iterator) releases its stream at once,
also while the remote peer leaves the caller's input unread: closing a socket with unsent input waits until that
input is sent, which a peer that never reads it postpones forever (real daemons on 127.0.0.1)."""

import asyncio
import contextlib
from typing import AsyncIterator

import pytest

from hivemind.p2p import P2PTimeoutError, protobuf_streams
from hivemind.p2p.framing import EncodedMessage
from hivemind.p2p.p2p_daemon_bindings.utils import encode_varint
from hivemind.proto import test_pb2

pytestmark = pytest.mark.timeout(60)

Response = test_pb2.TestResponse
CHUNK = 2**20


async def endless_large_input() -> AsyncIterator[EncodedMessage]:
    """1 MiB requests (a TestRequest with an unknown bytes field) for as long as they are taken."""
    while True:
        yield EncodedMessage([b"\x08\x01", b"\x12" + encode_varint(CHUNK), bytes(CHUNK)])


@pytest.fixture
async def never_reads(p2p_pair):
    """``(server, caller, started)``: the server serves "never_reads", which holds its streams and reads nothing."""
    server, caller = p2p_pair
    started = asyncio.Event()

    async def hold_without_reading(stream_info, reader, writer):
        started.set()
        await asyncio.sleep(3600)  # cancelled when the server shuts down

    await server.add_binary_stream_handler("never_reads", hold_without_reading)
    return server, caller, started


@pytest.fixture
def caller_writers(monkeypatch) -> list:
    """The writers of the stream calls made during the test (the caller's sockets to its p2pd)."""
    writers = []
    call_protobuf_stream = protobuf_streams.call_protobuf_stream

    def recording(reader, writer, *args, **kwargs):
        writers.append(writer)
        return call_protobuf_stream(reader, writer, *args, **kwargs)

    monkeypatch.setattr(protobuf_streams, "call_protobuf_stream", recording)
    return writers


async def assert_released(writers: list) -> None:
    (writer,) = writers
    with contextlib.suppress(ConnectionError):
        await asyncio.wait_for(writer.wait_closed(), 10)  # before: open (with ~4 MiB unsent) as long as the peer likes


async def test_a_timed_out_call_releases_its_stream_while_its_input_is_unread(
    never_reads, pipes_setting, caller_writers
):
    server, caller, started = never_reads
    with pytest.raises(P2PTimeoutError):
        await caller.call_protobuf_handler(server.peer_id, "never_reads", endless_large_input(), Response, timeout=1.5)
    assert started.is_set()
    await assert_released(caller_writers)


async def test_closing_the_response_iterator_releases_a_stream_with_unread_input(
    never_reads, pipes_setting, caller_writers
):
    server, caller, started = never_reads
    responses = await caller.iterate_protobuf_handler(server.peer_id, "never_reads", endless_large_input(), Response)
    consumer = asyncio.create_task(responses.__anext__())
    await asyncio.wait_for(started.wait(), 10)
    await asyncio.sleep(0.5)  # the input fills every buffer between the peers
    consumer.cancel()
    await asyncio.gather(consumer, return_exceptions=True)
    await asyncio.wait_for(responses.aclose(), 5)
    await assert_released(caller_writers)
