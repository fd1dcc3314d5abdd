"""The bytes of expert requests a handler holds at once are limited, in all and per caller: many streams that each
stay within their own limits (half-open ones, say, that send a whole request and never end) cannot together exhaust
the server's memory. A request that would go over is refused at once with an error that says so, other callers are
served meanwhile, and the bytes of every call are given back when it ends, however it ends."""

import asyncio

import pytest
import torch
from async_wait import wait_until
from moe_hostile_helpers import (
    HIDDEN,
    UID,
    as_stream,
    chunked,
    connect_attacker,
    drain,
    good_forward,
    hostile_server,
    sleep_forever_after,
)

from hivemind.compression import serialize_torch_tensor
from hivemind.moe.server.expert_requests import RequestBytesInFlight
from hivemind.p2p import P2PHandlerError
from hivemind.proto import runtime_pb2

__all__ = ["hostile_server"]  # the fixture, used by the tests below

ROWS = 64
STREAM_BYTES = 4 * (256 + 1024 + 256)  # four 1 KiB chunks, one per message: buffers plus what each costs on top


@pytest.fixture
async def two_callers(hostile_server):
    (first, first_stub), (second, second_stub) = (
        await connect_attacker(hostile_server),
        await connect_attacker(hostile_server),
    )
    try:
        yield first_stub, second_stub
    finally:
        await first.shutdown()
        await second.shutdown()


def limit_bytes_in_flight(server, monkeypatch, total: int, per_peer: int) -> RequestBytesInFlight:
    (handler,) = server.conn_handlers
    budget = RequestBytesInFlight(total, per_peer)
    monkeypatch.setattr(handler, "_bytes_in_flight", budget)
    return budget


async def half_open_stream(stub):
    """A whole request that never ends (no end-of-stream): its bytes stay held until the call is cancelled."""
    stalled = asyncio.Event()
    messages = sleep_forever_after(chunked(torch.randn(ROWS, HIDDEN)), stalled)
    call = asyncio.create_task(drain(await stub.rpc_forward_stream(messages)))
    await stalled.wait()
    return call


async def stop(call: asyncio.Task) -> None:
    call.cancel()
    await asyncio.gather(call, return_exceptions=True)


@pytest.mark.timeout(60)
async def test_caller_over_its_limit_is_refused_and_others_are_served(hostile_server, two_callers, monkeypatch):
    greedy, other = two_callers
    (handler,) = hostile_server.conn_handlers
    answer = handler._get_schemas()[UID].answer_bytes(ROWS, backward=False)  # held too, until the answer is sent
    per_peer = STREAM_BYTES + answer + 1024  # one call, not two
    budget = limit_bytes_in_flight(hostile_server, monkeypatch, total=100 * STREAM_BYTES, per_peer=per_peer)
    held = await half_open_stream(greedy)
    try:
        await wait_until(lambda: budget.used == STREAM_BYTES, "the half-open stream to hold its bytes")
        with pytest.raises(P2PHandlerError, match="your requests in progress on this server would hold over"):
            await drain(await greedy.rpc_forward_stream(as_stream(chunked(torch.randn(ROWS, HIDDEN)))))
        await good_forward(other)  # another caller is served meanwhile
    finally:
        await stop(held)
    await wait_until(lambda: budget.used == 0, "the bytes of the cancelled stream to be given back")
    await drain(await greedy.rpc_forward_stream(as_stream(chunked(torch.randn(ROWS, HIDDEN)))))


@pytest.mark.timeout(60)
async def test_requests_over_the_total_limit_are_refused_until_bytes_are_freed(
    hostile_server, two_callers, monkeypatch
):
    first, second = two_callers
    budget = limit_bytes_in_flight(hostile_server, monkeypatch, total=STREAM_BYTES + 1024, per_peer=10 * STREAM_BYTES)
    held = await half_open_stream(first)
    try:
        await wait_until(lambda: budget.used == STREAM_BYTES, "the half-open stream to hold its bytes")
        with pytest.raises(P2PHandlerError, match="the server holds over .* bytes of requests in progress"):
            await drain(await second.rpc_forward_stream(as_stream(chunked(torch.randn(ROWS, HIDDEN)))))
    finally:
        await stop(held)
    await wait_until(lambda: budget.used == 0, "the bytes of the cancelled stream to be given back")
    await good_forward(second)


@pytest.mark.timeout(60)
async def test_every_call_gives_its_bytes_back_however_it_ends(hostile_server, two_callers, monkeypatch):
    stub, _ = two_callers
    budget = limit_bytes_in_flight(hostile_server, monkeypatch, total=2**30, per_peer=2**30)
    await good_forward(stub)  # served (unary)
    await drain(await stub.rpc_forward_stream(as_stream(chunked(torch.randn(ROWS, HIDDEN)))))  # served (stream)
    with pytest.raises(P2PHandlerError):  # refused by its schema
        await stub.rpc_forward(runtime_pb2.ExpertRequest(uid=UID, tensors=[serialize_torch_tensor(torch.ones(2, 3))]))
    with pytest.raises(P2PHandlerError):  # cut short
        await drain(await stub.rpc_forward_stream(as_stream(chunked(torch.randn(ROWS, HIDDEN))[:2])))
    await stop(await half_open_stream(stub))  # abandoned by its caller
    await wait_until(lambda: budget.used == 0 and not budget.used_by_peer, "every call to give its bytes back")


def test_limits_are_derived_from_the_largest_valid_request(hostile_server):
    (handler,) = hostile_server.conn_handlers
    fresh = type(handler).__new__(type(handler))
    fresh.__dict__.update(handler.__dict__, _bytes_in_flight=None)
    fresh._hold(None, "a call")
    assert fresh._bytes_in_flight.total == 2 * 1024**3 and fresh._bytes_in_flight.per_peer == 256 * 1024**2
    fresh.__dict__.update(
        _bytes_in_flight=None, max_request_bytes_in_flight=10**6, max_request_bytes_in_flight_per_peer=10**5
    )
    fresh._hold(None, "a call")
    assert fresh._bytes_in_flight.total == 10**6 and fresh._bytes_in_flight.per_peer == 10**5
