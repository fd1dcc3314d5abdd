"""The p2p layer against peers that lie about sizes, leave early or never answer (real daemons on 127.0.0.1)."""

import asyncio
import time
from typing import AsyncIterator

import psutil
import pytest

from hivemind.p2p import P2P, P2PContext, P2PDaemonError, P2PHandlerError, ServicerBase, framing
from hivemind.p2p.framing import MESSAGE_MARKER, MessageTooLargeError, encode_header
from hivemind.p2p.inbound_budget import InboundBudget
from hivemind.p2p.p2p_daemon import P2PTimeoutError
from hivemind.p2p.p2p_daemon_bindings import streams
from hivemind.proto import test_pb2
from hivemind.utils.asyncio import as_aiter

pytestmark = pytest.mark.timeout(60)

Request, Response = test_pb2.TestRequest, test_pb2.TestResponse
MiB, GiB = 1024**2, 1024**3
ATTACK_STREAMS = 4
ALLOWED_GROWTH = 16 * MiB


async def total(requests: AsyncIterator[Request], context: P2PContext) -> Response:
    return Response(number=sum([request.number async for request in requests]))


def rss() -> int:
    return psutil.Process().memory_info().rss


async def open_attack_streams(attacker: P2P, server: P2P, name: str, announced: int) -> list:
    """Raw streams to a protobuf handler that each send only a frame header announcing ``announced`` bytes."""
    streams_opened = []
    for _ in range(ATTACK_STREAMS):
        _, reader, writer = await attacker.call_binary_stream_handler(server.peer_id, name)
        writer.write(encode_header(MESSAGE_MARKER, announced))
        await writer.drain()
        streams_opened.append((reader, writer))
    return streams_opened


@pytest.mark.parametrize("announced", [GiB, 30 * MiB], ids=["1GiB", "30MiB"])
async def test_announced_but_unsent_payloads_take_no_memory(p2p_pair, pipes_setting, announced, monkeypatch):
    server, attacker = p2p_pair
    reads_started = asyncio.Queue()
    read_payload = streams.DirectStreamReader.read_payload

    async def recording_read_payload(self, n: int):
        if n == announced:
            reads_started.put_nowait(n)  # before read_payload takes (or used to take) any memory for it
        return await read_payload(self, n)

    monkeypatch.setattr(streams.DirectStreamReader, "read_payload", recording_read_payload)
    await server.add_protobuf_handler("total", total, Request, stream_input=True, max_message_size=None)
    # admit all of them: this is about what admitted frames take (test_p2p_inbound_budget.py: refusing the excess)
    server.inbound_budget = InboundBudget(ATTACK_STREAMS * announced, per_peer_share=1)
    before = rss()
    attack = await open_attack_streams(attacker, server, "total", announced)
    for _ in range(ATTACK_STREAMS):
        await asyncio.wait_for(reads_started.get(), 10)
    growth = rss() - before
    assert growth < ALLOWED_GROWTH, f"{ATTACK_STREAMS} announced payloads took {growth / MiB:.1f} MiB"

    honest = await server_total(attacker, server, [1, 2, 3])
    assert honest == 6  # the node keeps serving everyone else meanwhile
    for _, writer in attack:
        writer.close()


async def server_total(caller: P2P, server: P2P, numbers: list) -> int:
    requests = as_aiter(*(Request(number=n) for n in numbers))
    response = await asyncio.wait_for(caller.call_protobuf_handler(server.peer_id, "total", requests, Response), 10)
    return response.number


async def test_frame_above_the_default_limit_is_refused_before_allocating(p2p_pair, pipes_setting):
    server, attacker = p2p_pair
    await server.add_protobuf_handler("total", total, Request, stream_input=True)
    before = rss()
    attack = await open_attack_streams(attacker, server, "total", GiB)
    for reader, writer in attack:
        _, error = await asyncio.wait_for(P2P.receive_protobuf(Response, reader), 10)
        assert "268435456 bytes" in error.message and "max_message_size" in error.message
        writer.close()
    assert rss() - before < ALLOWED_GROWTH
    assert await server_total(attacker, server, [4, 5]) == 9


async def test_request_over_the_handler_limit_fails_the_call_with_a_clear_error(p2p_pair):
    server, caller = p2p_pair
    await server.add_protobuf_handler("total", total, Request, stream_input=True, max_message_size=2)
    big = Request(number=2**30)  # 6 bytes serialized
    with pytest.raises(P2PHandlerError, match="6-byte message, more than the 2 bytes .* max_message_size"):
        await asyncio.wait_for(caller.call_protobuf_handler(server.peer_id, "total", as_aiter(big), Response), 10)
    assert await server_total(caller, server, [1]) == 1  # a 2-byte request still passes


@pytest.mark.parametrize("following", [0, 2000], ids=["alone", "with-more-input"])
async def test_the_refusal_reaches_a_caller_that_keeps_sending(p2p_pair, pipes_setting, following):
    # the handler side stops reading at the refused frame; closing with the rest unread must not reset the stream
    # before the caller has read the error frame
    server, caller = p2p_pair
    await server.add_protobuf_handler("total", total, Request, stream_input=True, max_message_size=2)
    for _ in range(5):
        requests = as_aiter(Request(number=2**30), *(Request(number=1) for _ in range(following)))
        with pytest.raises(P2PHandlerError, match="more than the 2 bytes"):
            await asyncio.wait_for(caller.call_protobuf_handler(server.peer_id, "total", requests, Response), 10)


async def test_response_over_the_callers_limit_fails_the_call(p2p_pair):
    server, caller = p2p_pair

    async def big_answer(request: Request, context: P2PContext) -> AsyncIterator[Response]:
        yield Response(number=1)
        yield Response(number=2**30)  # 6 bytes serialized

    await server.add_protobuf_handler("big_answer", big_answer, Request, stream_output=True)
    responses = await caller.iterate_protobuf_handler(
        server.peer_id, "big_answer", Request(), Response, max_message_size=2
    )
    assert (await responses.__anext__()).number == 1
    with pytest.raises(P2PDaemonError, match="max_message_size") as error:
        await asyncio.wait_for(responses.__anext__(), 10)
    assert isinstance(error.value.__cause__, MessageTooLargeError)


class SlowStreamHandler:
    """Yields one response, then waits for an hour; records when it sees CancelledError."""

    def __init__(self) -> None:
        self.cancelled = asyncio.Event()

    async def __call__(self, request: Request, context: P2PContext) -> AsyncIterator[Response]:
        yield Response(number=1)
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise


async def test_stream_handler_is_cancelled_when_the_caller_closes_the_iterator(p2p_pair, pipes_setting):
    server, caller = p2p_pair
    handler = SlowStreamHandler()
    await server.add_protobuf_handler("slow", handler, Request, stream_output=True)
    responses = await caller.iterate_protobuf_handler(server.peer_id, "slow", Request(), Response)
    assert (await responses.__anext__()).number == 1
    await responses.aclose()
    await asyncio.wait_for(handler.cancelled.wait(), 10)  # ms when idle; the hour-long sleep never ends on its own


class SlowServicer(ServicerBase):
    def __init__(self) -> None:
        self.handler = SlowStreamHandler()

    async def rpc_slow(self, request: Request, context: P2PContext) -> AsyncIterator[Response]:
        async for response in self.handler(request, context):
            yield response


async def test_servicer_handler_is_cancelled_when_the_stub_iterator_is_closed(p2p_pair):
    server, caller = p2p_pair
    servicer = SlowServicer()
    await servicer.add_p2p_handlers(server)
    responses = await SlowServicer.get_stub(caller, server.peer_id).rpc_slow(Request())
    assert (await responses.__anext__()).number == 1
    await responses.aclose()
    await asyncio.wait_for(servicer.handler.cancelled.wait(), 10)  # ms when idle; the sleep lasts an hour


async def test_stream_handler_is_cancelled_when_the_caller_closes_the_stream(p2p_pair, pipes_setting):
    server, caller = p2p_pair
    handler = SlowStreamHandler()
    await server.add_protobuf_handler("slow", handler, Request, stream_output=True)
    _, reader, writer = await caller.call_binary_stream_handler(server.peer_id, "slow")
    await P2P.send_protobuf(Request(), writer)
    await P2P.send_protobuf(P2P.END_OF_STREAM, writer)
    response, _ = await asyncio.wait_for(P2P.receive_protobuf(Response, reader), 10)
    assert response.number == 1
    writer.close()
    await asyncio.wait_for(handler.cancelled.wait(), 10)  # ms when idle; the hour-long sleep never ends on its own


async def test_handler_that_finishes_normally_is_not_cancelled(p2p_pair):
    server, caller = p2p_pair
    finished = []

    async def count(request: Request, context: P2PContext) -> AsyncIterator[Response]:
        for i in range(3):
            await asyncio.sleep(0.05)  # the caller's end-of-stream arrives while the handler still works
            yield Response(number=i)
        finished.append(True)

    await server.add_protobuf_handler("count", count, Request, stream_output=True)
    responses = await caller.iterate_protobuf_handler(server.peer_id, "count", Request(), Response)
    assert [r.number async for r in responses] == [0, 1, 2]
    assert finished == [True]


class SilentHandler:
    """A unary handler that accepts a call and never answers."""

    def __init__(self) -> None:
        self.started, self.cancelled = asyncio.Event(), asyncio.Event()

    async def __call__(self, request: Request, context: P2PContext) -> Response:
        self.started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled.set()
            raise


async def test_unary_call_to_a_silent_handler_times_out_by_default(p2p_factory):
    server = await p2p_factory()
    caller = await p2p_factory(initial_peers=await server.get_visible_maddrs(), unary_call_timeout=0.5)
    handler = SilentHandler()
    await server.add_protobuf_handler("silent", handler, Request)
    started = time.monotonic()
    with pytest.raises(P2PTimeoutError) as error:
        await asyncio.wait_for(caller.call_protobuf_handler(server.peer_id, "silent", Request(), Response), 10)
    assert 0.45 <= time.monotonic() - started < 5
    assert isinstance(error.value, asyncio.TimeoutError) and isinstance(error.value, P2PDaemonError)
    assert "`silent`" in str(error.value) and str(server.peer_id) in str(error.value)
    await asyncio.wait_for(handler.cancelled.wait(), 5)  # the abandoned call does not keep the server busy


async def test_unary_timeout_can_be_set_per_call(p2p_pair):
    server, caller = p2p_pair
    assert caller.unary_call_timeout is not None  # every unary call is bounded unless asked otherwise
    await server.add_protobuf_handler("silent", SilentHandler(), Request)
    with pytest.raises(P2PTimeoutError, match="within 0.2 s"):
        await asyncio.wait_for(
            caller.call_protobuf_handler(server.peer_id, "silent", Request(), Response, timeout=0.2), 10
        )


async def test_shutdown_cancels_and_awaits_every_task_it_owns():
    tasks_before = asyncio.all_tasks()
    server = await P2P.create()
    caller = await P2P.create(initial_peers=await server.get_visible_maddrs())
    unary_handler, stream_handler = SilentHandler(), SlowStreamHandler()
    await server.add_protobuf_handler("silent", unary_handler, Request)
    await server.add_protobuf_handler("slow", stream_handler, Request, stream_output=True)
    unary_call = asyncio.create_task(caller.call_protobuf_handler(server.peer_id, "silent", Request(), Response))
    responses = await caller.iterate_protobuf_handler(server.peer_id, "slow", Request(), Response)
    await responses.__anext__()
    await asyncio.wait_for(unary_handler.started.wait(), 10)

    await server.shutdown()
    assert unary_handler.cancelled.is_set() and stream_handler.cancelled.is_set()
    with pytest.raises((P2PDaemonError, P2PHandlerError)):
        await asyncio.wait_for(unary_call, 10)
    await responses.aclose()
    await caller.shutdown()
    leftovers = [task for task in asyncio.all_tasks() - tasks_before if task is not asyncio.current_task()]
    assert not leftovers, f"tasks left running after shutdown: {leftovers}"


@pytest.mark.parametrize(
    "sent",
    [encode_header(MESSAGE_MARKER, 100)[:3], encode_header(MESSAGE_MARKER, 100) + b"x" * 10],
    ids=["header", "payload"],
)
async def test_a_frame_left_unfinished_is_dropped_after_the_stall_timeout(p2p_pair, pipes_setting, sent, monkeypatch):
    monkeypatch.setattr(framing, "FRAME_STALL_TIMEOUT", 0.5)
    server, attacker = p2p_pair
    await server.add_protobuf_handler("total", total, Request, stream_input=True)
    _, reader, writer = await attacker.call_binary_stream_handler(server.peer_id, "total")
    writer.write(sent)
    await writer.drain()
    started = time.monotonic()
    await asyncio.wait_for(reader.read(), 10)  # everything the server sends until it closes the stream
    assert time.monotonic() - started < 5
    assert await server_total(attacker, server, [4, 5]) == 9
    writer.close()


async def test_a_stream_may_stay_idle_between_frames_beyond_the_stall_timeout(p2p_pair, monkeypatch):
    monkeypatch.setattr(framing, "FRAME_STALL_TIMEOUT", 0.2)
    server, caller = p2p_pair
    await server.add_protobuf_handler("total", total, Request, stream_input=True)

    async def slow_requests():
        for number in (1, 2):
            yield Request(number=number)
            await asyncio.sleep(0.6)

    response = await asyncio.wait_for(
        caller.call_protobuf_handler(server.peer_id, "total", slow_requests(), Response), 10
    )
    assert response.number == 3
