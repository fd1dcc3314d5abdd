"""Unary protobuf handlers through the daemon's persistent connection."""

import asyncio
import time

import pytest

from hivemind.p2p import P2PContext, P2PDaemonError, P2PHandlerError
from hivemind.proto import runtime_pb2, test_pb2

pytestmark = pytest.mark.timeout(60)


async def square(request: test_pb2.TestRequest, context: P2PContext) -> test_pb2.TestResponse:
    return test_pb2.TestResponse(number=request.number**2)


async def test_unary_calls_work_both_ways(p2p_pair):
    first, second = p2p_pair
    await first.add_protobuf_handler("square", square, test_pb2.TestRequest)
    await second.add_protobuf_handler("square", square, test_pb2.TestRequest)
    response = await second.call_protobuf_handler(
        first.peer_id, "square", test_pb2.TestRequest(number=12), test_pb2.TestResponse
    )
    assert response == test_pb2.TestResponse(number=144)
    response = await first.call_protobuf_handler(
        second.peer_id, "square", test_pb2.TestRequest(number=-3), test_pb2.TestResponse
    )
    assert response.number == 9


async def test_handler_receives_context_with_caller_id(p2p_pair):
    first, second = p2p_pair
    contexts = []

    async def remember(request: test_pb2.TestRequest, context: P2PContext) -> test_pb2.TestResponse:
        contexts.append(context)
        return test_pb2.TestResponse()

    await first.add_protobuf_handler("remember", remember, test_pb2.TestRequest)
    await second.call_protobuf_handler(first.peer_id, "remember", test_pb2.TestRequest(), test_pb2.TestResponse)
    assert contexts == [P2PContext(handle_name="remember", local_id=first.peer_id, remote_id=second.peer_id)]


async def test_concurrent_calls_are_multiplexed(p2p_pair):
    first, second = p2p_pair

    async def slow_square(request: test_pb2.TestRequest, context: P2PContext) -> test_pb2.TestResponse:
        await asyncio.sleep(0.01 * (request.number % 5))
        return test_pb2.TestResponse(number=request.number**2)

    await first.add_protobuf_handler("slow_square", slow_square, test_pb2.TestRequest)
    responses = await asyncio.gather(
        *(
            second.call_protobuf_handler(
                first.peer_id, "slow_square", test_pb2.TestRequest(number=i), test_pb2.TestResponse
            )
            for i in range(50)
        )
    )
    assert [r.number for r in responses] == [i**2 for i in range(50)]


async def test_handler_exception_arrives_as_handler_error_with_repr(p2p_pair):
    first, second = p2p_pair

    async def fail(request: test_pb2.TestRequest, context: P2PContext) -> test_pb2.TestResponse:
        raise ValueError("negative numbers are not welcome")

    await first.add_protobuf_handler("fail", fail, test_pb2.TestRequest)
    with pytest.raises(P2PHandlerError) as info:
        await second.call_protobuf_handler(
            first.peer_id, "fail", test_pb2.TestRequest(number=-1), test_pb2.TestResponse
        )
    assert "ValueError('negative numbers are not welcome')" in str(info.value)


async def test_calling_a_missing_handler_fails_fast(p2p_pair):
    first, second = p2p_pair
    started = time.monotonic()
    with pytest.raises(P2PDaemonError):
        await second.call_protobuf_handler(first.peer_id, "nobody.home", test_pb2.TestRequest(), test_pb2.TestResponse)
    assert time.monotonic() - started < 3


async def test_registering_the_same_name_twice_in_one_process_fails(p2p_pair):
    first, _ = p2p_pair
    await first.add_protobuf_handler("square", square, test_pb2.TestRequest)
    with pytest.raises(P2PDaemonError, match="already"):
        await first.add_protobuf_handler("square", square, test_pb2.TestRequest)


async def test_removed_handler_is_no_longer_served(p2p_pair):
    first, second = p2p_pair
    await first.add_protobuf_handler("square", square, test_pb2.TestRequest)
    await first.remove_protobuf_handler("square")
    with pytest.raises(P2PDaemonError):
        await second.call_protobuf_handler(first.peer_id, "square", test_pb2.TestRequest(), test_pb2.TestResponse)
    await first.add_protobuf_handler("square", square, test_pb2.TestRequest)  # the name is free again


def tensor_request(payload_size: int) -> runtime_pb2.ExpertRequest:
    return runtime_pb2.ExpertRequest(uid="x", tensors=[runtime_pb2.Tensor(buffer=b"\x01" * payload_size)])


async def echo_size(request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
    return runtime_pb2.ExpertResponse(tensors=[runtime_pb2.Tensor(size=[len(request.tensors[0].buffer)])])


async def find_largest_accepted_payload(p2p, peer_id, limit: int) -> int:
    """The payload size whose whole PersistentConnectionRequest is exactly ``limit`` bytes."""
    from hivemind.proto import p2pd_pb2

    payload = limit - 200
    while True:
        envelope = p2pd_pb2.PersistentConnectionRequest(
            callId=bytes(16),
            callUnary=p2pd_pb2.CallUnaryRequest(
                peer=peer_id.to_bytes(), proto="echo_size", data=tensor_request(payload).SerializeToString()
            ),
        )
        if envelope.ByteSize() >= limit:
            return payload - (envelope.ByteSize() - limit)
        payload += 1


async def test_message_just_under_the_size_limit_passes(p2p_factory):
    limit = 64 * 1024
    first = await p2p_factory(persistent_conn_max_msg_size=limit)
    second = await p2p_factory(persistent_conn_max_msg_size=limit, initial_peers=await first.get_visible_maddrs())
    await first.add_protobuf_handler("echo_size", echo_size, runtime_pb2.ExpertRequest)
    payload = await find_largest_accepted_payload(second, first.peer_id, limit)
    response = await second.call_protobuf_handler(
        first.peer_id, "echo_size", tensor_request(payload), runtime_pb2.ExpertResponse
    )
    assert list(response.tensors[0].size) == [payload]


async def test_message_over_the_size_limit_is_rejected_locally(p2p_pair):
    first, second = p2p_pair
    calls = []

    async def count_calls(request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        calls.append(request)
        return runtime_pb2.ExpertResponse()

    await first.add_protobuf_handler("count_calls", count_calls, runtime_pb2.ExpertRequest)
    with pytest.raises(P2PDaemonError, match="exceeds"):
        await second.call_protobuf_handler(
            first.peer_id, "count_calls", tensor_request(4 * 1024**2), runtime_pb2.ExpertResponse
        )
    await second.call_protobuf_handler(first.peer_id, "count_calls", tensor_request(10), runtime_pb2.ExpertResponse)
    assert len(calls) == 1  # only the small request reached the handler


async def test_oversized_response_becomes_an_error_instead_of_a_hang(p2p_factory):
    limit = 64 * 1024
    first = await p2p_factory(persistent_conn_max_msg_size=limit)
    second = await p2p_factory(persistent_conn_max_msg_size=limit, initial_peers=await first.get_visible_maddrs())

    async def too_big(request: test_pb2.TestRequest, context: P2PContext) -> runtime_pb2.Tensor:
        return runtime_pb2.Tensor(buffer=bytes(2 * limit))

    await first.add_protobuf_handler("too_big", too_big, test_pb2.TestRequest)
    with pytest.raises(P2PHandlerError, match="exceeding persistent_conn_max_msg_size"):
        await asyncio.wait_for(
            second.call_protobuf_handler(first.peer_id, "too_big", test_pb2.TestRequest(), runtime_pb2.Tensor), 10
        )


async def test_caller_cancellation_cancels_the_remote_handler(p2p_pair):
    first, second = p2p_pair
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def wait_forever(request: test_pb2.TestRequest, context: P2PContext) -> test_pb2.TestResponse:
        started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    await first.add_protobuf_handler("wait_forever", wait_forever, test_pb2.TestRequest)
    call = asyncio.create_task(
        second.call_protobuf_handler(first.peer_id, "wait_forever", test_pb2.TestRequest(), test_pb2.TestResponse)
    )
    await asyncio.wait_for(started.wait(), 10)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    await asyncio.wait_for(cancelled.wait(), 10)
    # the connection is still usable afterwards
    await first.add_protobuf_handler("square", square, test_pb2.TestRequest)
    response = await second.call_protobuf_handler(
        first.peer_id, "square", test_pb2.TestRequest(number=4), test_pb2.TestResponse
    )
    assert response.number == 16


async def test_callee_cancellation_fails_the_caller_promptly(p2p_pair):
    first, second = p2p_pair
    handler_tasks = []

    async def cancelled_inside(request: test_pb2.TestRequest, context: P2PContext) -> test_pb2.TestResponse:
        handler_tasks.append(asyncio.current_task())
        await asyncio.sleep(3600)

    await first.add_protobuf_handler("cancelled_inside", cancelled_inside, test_pb2.TestRequest)
    call = asyncio.create_task(
        second.call_protobuf_handler(first.peer_id, "cancelled_inside", test_pb2.TestRequest(), test_pb2.TestResponse)
    )
    while not handler_tasks:
        await asyncio.sleep(0.01)
    await first.shutdown()  # cancels the running handler and closes its connection to p2pd
    started = time.monotonic()
    with pytest.raises((P2PDaemonError, P2PHandlerError)):
        await asyncio.wait_for(call, 10)
    assert time.monotonic() - started < 5
