"""Stream handlers with hivemind framing and raw binary streams."""

import asyncio
import hashlib
import inspect
import os
import time
from typing import AsyncIterator

import pytest

from hivemind.p2p import P2P, P2PContext, P2PDaemonError, P2PHandlerError
from hivemind.proto import runtime_pb2, test_pb2
from hivemind.utils.asyncio import as_aiter

pytestmark = pytest.mark.timeout(60)

Request, Response = test_pb2.TestRequest, test_pb2.TestResponse


async def count_up_to(request: Request, context: P2PContext) -> AsyncIterator[Response]:
    for i in range(request.number):
        yield Response(number=i)


async def double_each(requests: AsyncIterator[Request], context: P2PContext) -> AsyncIterator[Response]:
    async for request in requests:
        yield Response(number=2 * request.number)


async def total(requests: AsyncIterator[Request], context: P2PContext) -> Response:
    return Response(number=sum([request.number async for request in requests]))


async def collect(iterator) -> list:
    return [item async for item in iterator]


def test_iterate_protobuf_handler_is_a_coroutine_returning_an_async_iterator():
    assert inspect.iscoroutinefunction(P2P.iterate_protobuf_handler)


async def test_unary_input_stream_output(p2p_pair):
    first, second = p2p_pair
    await first.add_protobuf_handler("count_up_to", count_up_to, Request, stream_output=True)
    responses = await collect(
        await second.iterate_protobuf_handler(first.peer_id, "count_up_to", Request(number=5), Response)
    )
    assert [r.number for r in responses] == [0, 1, 2, 3, 4]


async def test_stream_input_stream_output_both_ways(p2p_pair):
    first, second = p2p_pair
    for peer in p2p_pair:
        await peer.add_protobuf_handler("double_each", double_each, Request, stream_input=True, stream_output=True)
    for caller, callee in [(second, first), (first, second)]:
        requests = as_aiter(*(Request(number=i) for i in range(20)))
        responses = await collect(
            await caller.iterate_protobuf_handler(callee.peer_id, "double_each", requests, Response)
        )
        assert [r.number for r in responses] == [2 * i for i in range(20)]


async def test_stream_input_unary_output_through_call_protobuf_handler(p2p_pair):
    first, second = p2p_pair
    await first.add_protobuf_handler("total", total, Request, stream_input=True)
    requests = as_aiter(*(Request(number=i) for i in range(10)))
    assert (await second.call_protobuf_handler(first.peer_id, "total", requests, Response)).number == 45


async def test_empty_input_stream_reaches_handler_as_empty_iterator(p2p_pair):
    first, second = p2p_pair
    await first.add_protobuf_handler("total", total, Request, stream_input=True)
    assert (await second.call_protobuf_handler(first.peer_id, "total", as_aiter(), Response)).number == 0


async def test_handler_error_arrives_with_handler_name_and_text(p2p_pair):
    first, second = p2p_pair

    async def fail_after_two(request: Request, context: P2PContext) -> AsyncIterator[Response]:
        yield Response(number=1)
        yield Response(number=2)
        raise RuntimeError("ran out of numbers")

    await first.add_protobuf_handler("fail_after_two", fail_after_two, Request, stream_output=True)
    received = []
    with pytest.raises(P2PHandlerError, match="Failed to call handler `fail_after_two` at .*: ran out of numbers"):
        async for response in await second.iterate_protobuf_handler(
            first.peer_id, "fail_after_two", Request(), Response
        ):
            received.append(response.number)
    assert received == [1, 2]


async def test_stream_that_ends_normally_needs_no_round_trip_to_the_daemon(p2p_pair, monkeypatch):
    """p2pd half-closes the socket of a finished stream, so the caller can tell the end from a dead daemon."""
    first, second = p2p_pair
    await first.add_protobuf_handler("count_up_to", count_up_to, Request, stream_output=True)
    pings = []
    ping = second._client.ping
    monkeypatch.setattr(second._client, "ping", lambda: pings.append(1) or ping())
    for _ in range(3):
        responses = await collect(
            await second.iterate_protobuf_handler(first.peer_id, "count_up_to", Request(number=3), Response)
        )
        assert [r.number for r in responses] == [0, 1, 2]
    assert pings == []


async def test_unary_input_handler_rejects_two_requests(p2p_pair):
    first, second = p2p_pair
    await first.add_protobuf_handler("count_up_to", count_up_to, Request, stream_output=True)
    with pytest.raises(P2PHandlerError, match="exactly one request"):
        await collect(
            await second.iterate_protobuf_handler(
                first.peer_id, "count_up_to", as_aiter(Request(number=1), Request(number=2)), Response
            )
        )


async def test_missing_stream_handler_fails_fast(p2p_pair):
    first, second = p2p_pair
    started = time.monotonic()
    with pytest.raises(P2PDaemonError):
        await collect(await second.iterate_protobuf_handler(first.peer_id, "nobody.home", Request(), Response))
    assert time.monotonic() - started < 3


async def test_caller_input_error_propagates_and_ends_the_call(p2p_pair):
    first, second = p2p_pair
    await first.add_protobuf_handler("double_each", double_each, Request, stream_input=True, stream_output=True)

    async def broken_input():
        yield Request(number=1)
        raise KeyError("input went wrong")

    with pytest.raises(KeyError, match="input went wrong"):
        await asyncio.wait_for(
            collect(await second.iterate_protobuf_handler(first.peer_id, "double_each", broken_input(), Response)), 10
        )


async def test_caller_cancellation_stops_the_remote_handler(p2p_pair):
    first, second = p2p_pair
    handler_finished = asyncio.Event()

    async def endless(request: Request, context: P2PContext) -> AsyncIterator[Response]:
        try:
            while True:
                yield Response(number=1)
                await asyncio.sleep(0.01)
        finally:
            handler_finished.set()

    await first.add_protobuf_handler("endless", endless, Request, stream_output=True)

    async def consume():
        async for _ in await second.iterate_protobuf_handler(first.peer_id, "endless", Request(), Response):
            pass

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.wait_for(handler_finished.wait(), 10)


async def test_handler_side_cancellation_ends_the_caller_stream(p2p_pair):
    first, second = p2p_pair

    async def endless(request: Request, context: P2PContext) -> AsyncIterator[Response]:
        while True:
            yield Response(number=1)
            await asyncio.sleep(0.01)

    await first.add_protobuf_handler("endless", endless, Request, stream_output=True)
    responses = await second.iterate_protobuf_handler(first.peer_id, "endless", Request(), Response)
    assert (await responses.__anext__()).number == 1
    await first.shutdown()  # cancels the running handler, which sends an error frame (best effort) and closes
    started = time.monotonic()
    try:
        await asyncio.wait_for(collect(responses), 10)
    except P2PHandlerError as e:
        assert "cancelled" in str(e)
    assert time.monotonic() - started < 5


async def test_large_messages_arrive_intact(p2p_pair):
    first, second = p2p_pair
    chunks = [os.urandom(1024**2) for _ in range(8)]

    async def digest(requests: AsyncIterator[runtime_pb2.Tensor], context: P2PContext) -> runtime_pb2.Tensor:
        hasher = hashlib.sha256()
        async for request in requests:
            hasher.update(request.buffer)
        return runtime_pb2.Tensor(buffer=hasher.digest())

    await first.add_protobuf_handler("digest", digest, runtime_pb2.Tensor, stream_input=True)
    requests = as_aiter(*(runtime_pb2.Tensor(buffer=chunk) for chunk in chunks))
    response = await second.call_protobuf_handler(first.peer_id, "digest", requests, runtime_pb2.Tensor)
    assert response.buffer == hashlib.sha256(b"".join(chunks)).digest()


async def test_wire_bytes_follow_hivemind_framing(p2p_pair):
    first, second = p2p_pair
    received = asyncio.get_running_loop().create_future()

    async def record(stream_info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        data = b""
        while not data.endswith(P2P.ERROR_MARKER + bytes(P2P.HEADER_LEN)):
            data += await reader.read(1024)
        received.set_result((stream_info, data))
        await P2P.send_protobuf(Response(number=7), writer)

    await first.add_binary_stream_handler("record", record)
    response = await second.call_protobuf_handler(first.peer_id, "record", as_aiter(Request(number=300)), Response)
    assert response.number == 7
    stream_info, data = await received
    payload = Request(number=300).SerializeToString()
    assert data == b"\x00" + len(payload).to_bytes(8, "big") + payload + bytes.fromhex("010000000000000000")
    assert stream_info.peer_id == second.peer_id and stream_info.proto == "record"


async def test_binary_stream_handler_with_raw_data_helpers(p2p_pair):
    first, second = p2p_pair

    async def reverse(stream_info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        data = await P2P.receive_raw_data(reader)
        await P2P.send_raw_data(data[::-1], writer)

    await first.add_binary_stream_handler("reverse", reverse)
    stream_info, reader, writer = await second.call_binary_stream_handler(first.peer_id, "reverse")
    try:
        assert stream_info.peer_id == first.peer_id and stream_info.proto == "reverse"
        await P2P.send_raw_data(b"hello", writer)
        assert await P2P.receive_raw_data(reader) == b"olleh"
    finally:
        writer.close()
    await first.remove_binary_stream_handler("reverse")
    # the caller's daemon may still believe the protocol is served (go-libp2p negotiates lazily for protocols
    # the remote announced), so the failure shows either at open time or as a stream without any response
    with pytest.raises((P2PDaemonError, P2PHandlerError)):
        await second.call_protobuf_handler(first.peer_id, "reverse", as_aiter(Request()), Response)


async def test_stream_and_unary_handlers_share_one_namespace(p2p_pair):
    first, _ = p2p_pair
    await first.add_protobuf_handler("count_up_to", count_up_to, Request, stream_output=True)
    with pytest.raises(P2PDaemonError, match="already"):
        await first.add_protobuf_handler("count_up_to", count_up_to, Request, stream_output=True)
