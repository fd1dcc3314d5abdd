"""A hostile client against a real expert Server: each attack gets a clear error, the expert stays sound and
keeps serving a good client."""

import asyncio
import time

import pytest
import torch
from moe_hostile_helpers import (
    HIDDEN,
    UID,
    as_stream,
    attacker,
    drain,
    good_forward,
    hostile_server,
    make_request,
    parameters_of,
    peak_rss,
    sleep_forever_after,
)

from hivemind.compression import serialize_torch_tensor
from hivemind.p2p import P2PHandlerError
from hivemind.p2p.framing import EncodedMessage
from hivemind.proto import runtime_pb2
from hivemind.utils.streaming import split_for_streaming

__all__ = ["attacker", "hostile_server"]  # the fixtures, used by the tests below

NON_FINITE = [float("nan"), float("inf"), float("-inf")]


@pytest.mark.parametrize("value", NON_FINITE, ids=["nan", "inf", "-inf"])
async def test_non_finite_gradient_is_refused_and_expert_parameters_stay_intact(hostile_server, attacker, value):
    _, stub = attacker
    before = parameters_of(hostile_server)
    grad = torch.randn(3, HIDDEN)
    grad[1, 2] = value
    with pytest.raises(P2PHandlerError, match="NaN or infinite"):
        await stub.rpc_backward(make_request(UID, torch.randn(3, HIDDEN), grad), timeout=30)
    assert all(torch.equal(b, a) for b, a in zip(before, parameters_of(hostile_server)))
    assert torch.isfinite(await good_forward(stub)).all()


@pytest.mark.parametrize("value", NON_FINITE, ids=["nan", "inf", "-inf"])
async def test_non_finite_input_is_refused(hostile_server, attacker, value):
    _, stub = attacker
    x = torch.randn(3, HIDDEN)
    x[0, 0] = value
    with pytest.raises(P2PHandlerError, match="NaN or infinite"):
        await stub.rpc_forward(make_request(UID, x), timeout=30)
    before = parameters_of(hostile_server)
    with pytest.raises(P2PHandlerError, match="NaN or infinite"):
        await stub.rpc_backward(make_request(UID, x, torch.randn(3, HIDDEN)), timeout=30)
    assert all(torch.equal(b, a) for b, a in zip(before, parameters_of(hostile_server)))


async def test_finite_gradient_that_overflows_the_update_leaves_parameters_finite(hostile_server, attacker):
    _, stub = attacker
    # the bias gradient sums 3 rows of 3e38 (tanh'(0) = 1): inf in float32, although every value sent is finite
    huge = torch.full((3, HIDDEN), 3e38)
    await stub.rpc_backward(make_request("expert.1", torch.zeros(3, HIDDEN), huge), timeout=30)  # (update skipped)
    assert all(torch.isfinite(parameter).all() for parameter in parameters_of(hostile_server, "expert.1"))
    assert torch.isfinite(await good_forward(stub, "expert.1")).all()


def _head_chunk(rows: int = 2) -> runtime_pb2.Tensor:
    return next(split_for_streaming(serialize_torch_tensor(torch.randn(rows, HIDDEN)), chunk_size_bytes=32))


async def test_stalled_stream_is_dropped_and_good_clients_are_served_meanwhile(hostile_server, attacker, monkeypatch):
    _, stub = attacker
    for handler in hostile_server.conn_handlers:
        monkeypatch.setattr(handler, "stream_stall_timeout", 1.0)
    stalled = asyncio.Event()
    first = runtime_pb2.ExpertRequest(uid=UID, tensors=[_head_chunk()])
    started = time.monotonic()
    call = asyncio.create_task(drain(await stub.rpc_forward_stream(sleep_forever_after([first], stalled))))
    await stalled.wait()
    await good_forward(stub)  # served while the stalled stream waits
    with pytest.raises(P2PHandlerError, match="no message for"):
        await asyncio.wait_for(call, 20)
    assert time.monotonic() - started < 15


@pytest.mark.timeout(30)
async def test_stream_of_endless_empty_messages_is_refused(hostile_server, attacker):
    _, stub = attacker
    empty_chunks = runtime_pb2.ExpertRequest(uid=UID, tensors=[runtime_pb2.Tensor()])  # (more: refused by count)
    bare = runtime_pb2.ExpertRequest(uid=UID)

    head = _head_chunk()
    head.chunks = 0  # announces no chunk count, so that only the byte budget can stop the messages that follow

    def endless():
        yield runtime_pb2.ExpertRequest(uid=UID, tensors=[head])
        for index in range(20000):  # far more than any valid request of this expert needs (~500 fit)
            yield empty_chunks if index % 2 else bare

    async def endless_stream():
        for request in endless():
            yield request

    responses = []
    try:  # refused part-way: the error frame may be overtaken by the stream's reset (then the stream just ends)
        async for response in await stub.rpc_forward_stream(endless_stream()):
            responses.append(response)
    except P2PHandlerError as e:
        assert "more data than" in str(e)
    assert responses == []
    await good_forward(stub)


@pytest.mark.timeout(60)
async def test_stream_message_of_millions_of_empty_tensors_is_refused_before_parsing(hostile_server, attacker):
    _, stub = attacker
    # 16 MiB on the wire, 8M empty Tensor entries: parsing it would take ~40x that (over 600 MiB) in the server
    uid_field = runtime_pb2.ExpertRequest(uid=UID).SerializeToString()
    message = EncodedMessage([uid_field, b"\x12\x00" * (8 * 1024**2)])
    peak_before = peak_rss()
    error = None
    try:
        await drain(await stub.rpc_forward_stream(as_stream([message])))
    except P2PHandlerError as e:
        error = e
    peak_growth = peak_rss() - peak_before
    assert peak_growth < 200 * 1024**2, f"the server's memory peaked {peak_growth / 2**20:.0f} MiB higher"
    assert error is None or "bytes accepted here" in str(error)  # (or the refusal arrived as a bare end of stream)
    await good_forward(stub)
