"""ConnectionHandler over real p2pd daemons: results equal local ones, bad requests are refused before batching."""

import asyncio
import concurrent.futures
import threading
from typing import Callable, List, Sequence

import pytest
import torch

from hivemind.compression import serialize_torch_tensor
from hivemind.dht import DHT
from hivemind.moe.server.connection_handler import ConnectionHandler
from hivemind.p2p import P2P, P2PDaemonError, P2PHandlerError
from hivemind.proto import runtime_pb2
from hivemind.utils.serializer import MSGPackSerializer
from hivemind.utils.streaming import split_for_streaming
from hivemind.utils.tensor_descr import BatchTensorDescriptor

HIDDEN = 8
MAX_BATCH = 16


class RecordingPool:
    """A stand-in task pool: runs each task on a worker thread (or holds it) and records what it received."""

    def __init__(self, function: Callable, max_batch_size: int, hold: bool = False):
        self.function, self.max_batch_size, self.hold = function, max_batch_size, hold
        self.tasks: List[Sequence[torch.Tensor]] = []
        self.futures: List[concurrent.futures.Future] = []
        self.submitted, self.finished = threading.Event(), threading.Event()

    def submit_task(self, *tensors: torch.Tensor) -> concurrent.futures.Future:
        future = concurrent.futures.Future()
        future.add_done_callback(lambda _: self.finished.set())
        self.tasks.append(tensors)
        self.futures.append(future)
        self.submitted.set()
        if not self.hold:
            future.set_result(self.function(*tensors))
        return future


class LinearBackend:
    """What ConnectionHandler needs from a ModuleBackend: schemas, pools and get_info()."""

    def __init__(self, hold: bool = False):
        torch.manual_seed(0)
        self.module = torch.nn.Linear(HIDDEN, HIDDEN)
        self.forward_schema = ((BatchTensorDescriptor(HIDDEN, dtype=torch.float32),), {})
        self.outputs_schema = BatchTensorDescriptor(HIDDEN, dtype=torch.float32)
        self.forward_pool = RecordingPool(self.forward, MAX_BATCH, hold=hold)
        self.backward_pool = RecordingPool(self.backward, MAX_BATCH, hold=hold)

    def forward(self, x):
        with torch.no_grad():
            return (self.module(x),)

    def backward(self, x, grad_output):
        x = x.detach().requires_grad_(True)
        self.module(x).backward(grad_output)
        return (x.grad,)

    def get_info(self):
        return dict(forward_schema=self.forward_schema, outputs_schema=self.outputs_schema, keyword_names=())


@pytest.fixture
async def served():
    """(client p2p, server peer id, backends, handler): a handler in a thread next to a DHT, and a client peer."""
    backends = {"expert.0": LinearBackend(), "expert.1": LinearBackend(hold=True)}
    dht = DHT(start=True)
    handler = ConnectionHandler(dht, backends)
    handler.run_in_thread(await_ready=True, timeout=30)
    client = await P2P.create(initial_peers=[str(maddr) for maddr in dht.get_visible_maddrs()])
    try:
        yield client, dht.peer_id, backends, handler
    finally:
        await client.shutdown()
        handler.shutdown()
        dht.shutdown()


def make_request(uid: str, *tensors: torch.Tensor) -> runtime_pb2.ExpertRequest:
    return runtime_pb2.ExpertRequest(uid=uid, tensors=[serialize_torch_tensor(tensor) for tensor in tensors])


async def call_forward(client, peer_id, request):
    stub = ConnectionHandler.get_stub(client, peer_id)
    return await stub.rpc_forward(request, timeout=30)


async def test_forward_and_backward_equal_local_results(served):
    client, peer_id, backends, _ = served
    backend = backends["expert.0"]
    x, grad = torch.randn(5, HIDDEN), torch.randn(5, HIDDEN)
    stub = ConnectionHandler.get_stub(client, peer_id)

    response = await stub.rpc_forward(make_request("expert.0", x), timeout=30)
    from hivemind.compression import deserialize_torch_tensor

    (output,) = [deserialize_torch_tensor(tensor) for tensor in response.tensors]
    assert torch.allclose(output, backend.module(x).detach(), atol=1e-6)

    response = await stub.rpc_backward(make_request("expert.0", x, grad), timeout=30)
    (grad_input,) = [deserialize_torch_tensor(tensor) for tensor in response.tensors]
    assert torch.allclose(grad_input, grad @ backend.module.weight.detach(), atol=1e-5)


async def test_info_is_the_backend_info(served):
    client, peer_id, backends, _ = served
    stub = ConnectionHandler.get_stub(client, peer_id)
    response = await stub.rpc_info(runtime_pb2.ExpertUID(uid="expert.0"), timeout=30)
    info = MSGPackSerializer.loads(response.serialized_info)
    assert list(info) == ["forward_schema", "outputs_schema", "keyword_names"]
    assert info["outputs_schema"] == backends["expert.0"].outputs_schema


async def test_streamed_forward_equals_unary(served):
    client, peer_id, backends, _ = served
    x = torch.randn(MAX_BATCH, HIDDEN)
    chunks = list(split_for_streaming(serialize_torch_tensor(x), chunk_size_bytes=100))
    assert len(chunks) > 3
    requests = [runtime_pb2.ExpertRequest(uid="expert.0", tensors=[chunk]) for chunk in chunks]
    stub = ConnectionHandler.get_stub(client, peer_id)

    async def as_stream():
        for request in requests:
            yield request

    from hivemind.compression import deserialize_tensor_stream

    responses = await stub.rpc_forward_stream(as_stream())

    async def tensor_lists():
        async for response in responses:
            yield response.tensors

    (output,) = await deserialize_tensor_stream(tensor_lists())
    assert torch.allclose(output, backends["expert.0"].module(x).detach(), atol=1e-6)


def _bad_tensor() -> runtime_pb2.Tensor:
    tensor = serialize_torch_tensor(torch.randn(2, HIDDEN))
    tensor.buffer = tensor.buffer[:-3]  # 3 bytes short of the announced shape
    return tensor


BAD_REQUESTS = {
    "unknown uid": (runtime_pb2.ExpertRequest(uid="expert.404"), "unknown expert uid"),
    "wrong width": (make_request("expert.0", torch.randn(2, HIDDEN + 1)), "shape"),
    "wrong rank": (make_request("expert.0", torch.randn(2, HIDDEN, 1)), "shape"),
    "wrong dtype": (make_request("expert.0", torch.randn(2, HIDDEN, dtype=torch.float64)), "dtype"),
    "too many tensors": (make_request("expert.0", torch.randn(2, HIDDEN), torch.randn(2, HIDDEN)), "expects 1"),
    "no tensors": (make_request("expert.0"), "expects 1"),
    "empty batch": (make_request("expert.0", torch.randn(0, HIDDEN)), "empty"),
    "over max_batch_size": (make_request("expert.0", torch.randn(MAX_BATCH + 1, HIDDEN)), "max_batch_size"),
    "undecodable": (runtime_pb2.ExpertRequest(uid="expert.0", tensors=[_bad_tensor()]), "could not be decoded"),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
async def test_bad_request_is_refused_before_batching_and_server_keeps_serving(served, case):
    client, peer_id, backends, _ = served
    request, expected_text = BAD_REQUESTS[case]
    with pytest.raises(P2PHandlerError, match=expected_text):
        await call_forward(client, peer_id, request)
    assert backends["expert.0"].forward_pool.tasks == [], "a malformed request reached the task pool"

    good = await call_forward(client, peer_id, make_request("expert.0", torch.randn(3, HIDDEN)))
    assert list(good.tensors[0].size) == [3, HIDDEN]


async def test_backward_with_mismatched_gradient_is_refused(served):
    client, peer_id, backends, _ = served
    stub = ConnectionHandler.get_stub(client, peer_id)
    with pytest.raises(P2PHandlerError, match="batch size"):
        await stub.rpc_backward(make_request("expert.0", torch.randn(3, HIDDEN), torch.randn(4, HIDDEN)), timeout=30)
    assert backends["expert.0"].backward_pool.tasks == []


async def test_malformed_request_among_concurrent_good_ones(served):
    client, peer_id, backends, _ = served
    good = [make_request("expert.0", torch.randn(4, HIDDEN)) for _ in range(8)]
    bad = make_request("expert.0", torch.randn(4, HIDDEN + 3))
    results = await asyncio.gather(
        *(call_forward(client, peer_id, request) for request in good[:4] + [bad] + good[4:]), return_exceptions=True
    )
    assert isinstance(results[4], P2PHandlerError)
    assert all(isinstance(result, runtime_pb2.ExpertResponse) for index, result in enumerate(results) if index != 4)
    assert len(backends["expert.0"].forward_pool.tasks) == 8


async def test_stream_naming_two_experts_is_refused(served):
    client, peer_id, _, _ = served
    chunks = list(split_for_streaming(serialize_torch_tensor(torch.randn(4, HIDDEN)), chunk_size_bytes=64))
    requests = [runtime_pb2.ExpertRequest(uid=f"expert.{i % 2}", tensors=[chunk]) for i, chunk in enumerate(chunks)]

    async def as_stream():
        for request in requests:
            yield request

    stub = ConnectionHandler.get_stub(client, peer_id)
    with pytest.raises(P2PHandlerError, match="same expert"):
        async for _ in await stub.rpc_forward_stream(as_stream()):
            pass


async def test_stream_over_the_byte_budget_is_refused(served):
    client, peer_id, backends, _ = served
    huge = serialize_torch_tensor(torch.randn(MAX_BATCH * 5000, HIDDEN))  # 2.5 MB, far over MAX_BATCH rows
    # one message: refused as it arrives (a caller still sending more input would race the refusal in the p2p layer)
    requests = [runtime_pb2.ExpertRequest(uid="expert.0", tensors=[huge])]

    async def as_stream():
        for request in requests:
            yield request

    stub = ConnectionHandler.get_stub(client, peer_id)
    with pytest.raises(P2PHandlerError, match="more data than"):
        async for _ in await stub.rpc_forward_stream(as_stream()):
            pass
    assert backends["expert.0"].forward_pool.tasks == []


async def test_caller_that_goes_away_cancels_its_task(served):
    client, peer_id, backends, _ = served
    held_pool = backends["expert.1"].forward_pool  # never completes tasks by itself
    call = asyncio.create_task(call_forward(client, peer_id, make_request("expert.1", torch.randn(2, HIDDEN))))
    assert await asyncio.get_running_loop().run_in_executor(None, held_pool.submitted.wait, 30)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    (future,) = held_pool.futures
    # the cancellation crosses both daemons and the handler's event loop
    assert await asyncio.get_running_loop().run_in_executor(None, held_pool.finished.wait, 30)
    assert future.cancelled()


async def test_shutdown_unregisters_handlers(served):
    client, peer_id, _, handler = served
    handler.shutdown()
    assert not handler.is_alive()
    with pytest.raises((P2PHandlerError, P2PDaemonError)):
        await call_forward(client, peer_id, make_request("expert.0", torch.randn(2, HIDDEN)))
