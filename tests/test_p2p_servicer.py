"""ServicerBase / StubBase over real daemons: handle names, namespaces, streaming kinds, timeouts."""

import asyncio
from typing import AsyncIterator

import pytest

from hivemind.p2p import P2PContext, P2PDaemonError, P2PHandlerError, ServicerBase, StubBase
from hivemind.proto import test_pb2
from hivemind.utils.asyncio import as_aiter

pytestmark = pytest.mark.timeout(60)

Request, Response = test_pb2.TestRequest, test_pb2.TestResponse


class CalculatorServicer(ServicerBase):
    def __init__(self, offset: int = 0):
        self.offset = offset

    async def rpc_square(self, request: Request, context: P2PContext) -> Response:
        return Response(number=request.number**2 + self.offset)

    async def rpc_count(self, request: Request, context: P2PContext) -> AsyncIterator[Response]:
        for i in range(request.number):
            yield Response(number=i + self.offset)

    async def rpc_sum(self, requests: AsyncIterator[Request], context: P2PContext) -> Response:
        return Response(number=sum([r.number async for r in requests]) + self.offset)

    async def rpc_echo_stream(self, requests: AsyncIterator[Request], context: P2PContext) -> AsyncIterator[Response]:
        async for request in requests:
            yield Response(number=request.number + self.offset)

    async def rpc_sleep(self, request: Request, context: P2PContext) -> Response:
        await asyncio.sleep(request.number)
        return Response(number=request.number)

    async def rpc_caller(self, request: Request, context: P2PContext) -> Response:
        assert context.handle_name.endswith("CalculatorServicer.rpc_caller")
        return Response(number=len(context.remote_id.to_bytes()))


async def test_stub_calls_every_kind_of_rpc(p2p_pair):
    first, second = p2p_pair
    await CalculatorServicer().add_p2p_handlers(first)
    stub = CalculatorServicer.get_stub(second, first.peer_id)
    assert isinstance(stub, StubBase)
    assert (await stub.rpc_square(Request(number=9))).number == 81
    assert [r.number async for r in await stub.rpc_count(Request(number=3))] == [0, 1, 2]
    assert (await stub.rpc_sum(as_aiter(Request(number=1), Request(number=2)))).number == 3
    assert (await stub.rpc_sum(Request(number=5))).number == 5  # a single message is sent as a one-item stream
    assert [r.number async for r in await stub.rpc_echo_stream(as_aiter(Request(number=4)))] == [4]
    assert (await stub.rpc_caller(Request())).number == len(second.peer_id.to_bytes())


async def test_handlers_are_registered_under_wire_handle_names(p2p_pair):
    first, second = p2p_pair
    await CalculatorServicer().add_p2p_handlers(first, namespace="run1")
    response = await second.call_protobuf_handler(
        first.peer_id, "run1::CalculatorServicer.rpc_square", Request(number=3), Response
    )
    assert response.number == 9
    responses = await second.iterate_protobuf_handler(
        first.peer_id, "run1::CalculatorServicer.rpc_count", Request(number=2), Response
    )
    assert [r.number async for r in responses] == [0, 1]


async def test_namespaces_let_servicers_share_a_daemon(p2p_pair):
    first, second = p2p_pair
    await CalculatorServicer(offset=100).add_p2p_handlers(first, namespace="a")
    await CalculatorServicer(offset=200).add_p2p_handlers(first, namespace="b")
    stub_a = CalculatorServicer.get_stub(second, first.peer_id, namespace="a")
    stub_b = CalculatorServicer.get_stub(second, first.peer_id, namespace="b")
    assert (await stub_a.rpc_square(Request(number=2))).number == 104
    assert (await stub_b.rpc_square(Request(number=2))).number == 204
    with pytest.raises(P2PDaemonError):
        await CalculatorServicer.get_stub(second, first.peer_id).rpc_square(Request(number=2))


async def test_same_servicer_twice_without_namespace_fails(p2p_pair):
    first, _ = p2p_pair
    await CalculatorServicer().add_p2p_handlers(first)
    with pytest.raises(P2PDaemonError, match="already"):
        await CalculatorServicer().add_p2p_handlers(first)


async def test_wrapper_supplies_the_implementations(p2p_pair):
    first, second = p2p_pair

    class Wrapper:
        def __getattr__(self, name):
            servicer = CalculatorServicer(offset=1000)
            return getattr(servicer, name)

    await CalculatorServicer().add_p2p_handlers(first, wrapper=Wrapper())
    assert (await CalculatorServicer.get_stub(second, first.peer_id).rpc_square(Request(number=1))).number == 1001


async def test_removed_handlers_are_not_served(p2p_pair):
    first, second = p2p_pair
    servicer = CalculatorServicer()
    await servicer.add_p2p_handlers(first, namespace="tmp")
    await servicer.remove_p2p_handlers(first, namespace="tmp")
    with pytest.raises(P2PDaemonError):
        await CalculatorServicer.get_stub(second, first.peer_id, namespace="tmp").rpc_square(Request())
    await servicer.add_p2p_handlers(first, namespace="tmp")  # names are free again


async def test_unary_timeout_raises_timeout_error(p2p_pair):
    first, second = p2p_pair
    await CalculatorServicer().add_p2p_handlers(first)
    stub = CalculatorServicer.get_stub(second, first.peer_id)
    with pytest.raises(asyncio.TimeoutError):
        await stub.rpc_sleep(Request(number=30), timeout=0.2)
    assert (await stub.rpc_sleep(Request(number=0), timeout=5)).number == 0


async def test_timeout_on_streaming_output_is_a_value_error(p2p_pair):
    first, second = p2p_pair
    stub = CalculatorServicer.get_stub(second, first.peer_id)
    with pytest.raises(ValueError, match="timeout"):
        await stub.rpc_count(Request(number=1), timeout=1)


async def test_subclass_serves_and_calls_under_its_own_name(p2p_pair):
    first, second = p2p_pair

    class ScaledCalculator(CalculatorServicer):
        async def rpc_square(self, request: Request, context: P2PContext) -> Response:
            return Response(number=10 * request.number**2)

    CalculatorServicer.get_stub(second, first.peer_id)  # the parent's stub exists first (the original would reuse it)
    await ScaledCalculator().add_p2p_handlers(first)
    assert (await ScaledCalculator.get_stub(second, first.peer_id).rpc_square(Request(number=2))).number == 40
    response = await second.call_protobuf_handler(
        first.peer_id, "ScaledCalculator.rpc_square", Request(number=1), Response
    )
    assert response.number == 10


async def test_remote_exception_reaches_stub_caller(p2p_pair):
    first, second = p2p_pair

    class Failing(ServicerBase):
        async def rpc_fail(self, request: Request, context: P2PContext) -> Response:
            raise ZeroDivisionError("no dividing by zero")

        async def rpc_fail_stream(self, request: Request, context: P2PContext) -> AsyncIterator[Response]:
            raise ZeroDivisionError("no streaming by zero")
            yield

    await Failing().add_p2p_handlers(first)
    stub = Failing.get_stub(second, first.peer_id)
    with pytest.raises(P2PHandlerError, match=r"ZeroDivisionError\('no dividing by zero'\)"):
        await stub.rpc_fail(Request())
    with pytest.raises(P2PHandlerError, match="no streaming by zero"):
        async for _ in await stub.rpc_fail_stream(Request()):
            pass
