"""A real expert Server (ModuleBackends, Runtime, handlers, p2pd) and a raw client for the hostile-client tests; a fake
expert server that answers with hand-made handlers for the hostile-server tests."""

import asyncio
import resource
from typing import AsyncIterator, Callable, Iterable, List, Optional, Tuple

import pytest
import torch

from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.dht import DHT
from hivemind.moe.client.expert_rpc import ConnectionHandler as ExpertRPCs
from hivemind.moe.client.expert_rpc import call_expert, raw_size_of, response_size_limit
from hivemind.moe.server.connection_handler import ConnectionHandler
from hivemind.moe.server.module_backend import ModuleBackend
from hivemind.moe.server.server import Server
from hivemind.p2p import P2P
from hivemind.p2p.framing import EncodedMessage
from hivemind.proto import runtime_pb2
from hivemind.utils.streaming import split_for_streaming
from hivemind.utils.tensor_descr import BatchTensorDescriptor

HIDDEN = 16
MAX_BATCH = 64
UID = "expert.0"


def make_backends(uids: Iterable[str], lr: float = 0.1):
    backends = {}
    for index, uid in enumerate(uids):
        torch.manual_seed(index)
        module = torch.nn.Sequential(torch.nn.Linear(HIDDEN, HIDDEN), torch.nn.Tanh())
        backends[uid] = ModuleBackend(
            uid,
            module,
            optimizer=torch.optim.SGD(module.parameters(), lr=lr),
            args_schema=(BatchTensorDescriptor(HIDDEN),),
            outputs_schema=BatchTensorDescriptor(HIDDEN),
            max_batch_size=MAX_BATCH,
        )
    return backends


def start_hostile_server() -> Server:
    """A Server hosting expert.0 and expert.1 (SGD-trained), started in this process."""
    return Server(DHT(start=True), make_backends([UID, "expert.1"]), update_period=30, start=True)


async def connect_attacker(server: Server):
    """(client P2P connected to the server, stub of the server's ConnectionHandler)."""
    client = await P2P.create(initial_peers=[str(maddr) for maddr in server.dht.get_visible_maddrs()])
    return client, ConnectionHandler.get_stub(client, server.dht.peer_id)


@pytest.fixture(scope="module")
def hostile_server():
    """A hostile-test Server shared by the tests of one module (import this fixture into it)."""
    server = start_hostile_server()
    try:
        yield server
    finally:
        server.shutdown()


@pytest.fixture
async def attacker(hostile_server):
    """``(client, stub)``: a raw client P2P connected to ``hostile_server`` and its ConnectionHandler stub."""
    client, stub = await connect_attacker(hostile_server)
    try:
        yield client, stub
    finally:
        await client.shutdown()


def make_request(uid: str, *tensors: torch.Tensor) -> runtime_pb2.ExpertRequest:
    return runtime_pb2.ExpertRequest(uid=uid, tensors=[serialize_torch_tensor(tensor) for tensor in tensors])


def chunked(*tensors: torch.Tensor, uid: str = UID) -> List[runtime_pb2.ExpertRequest]:
    """One ExpertRequest per chunk, as clients stream them (1 KiB chunks, so that small tensors have several)."""
    return [
        runtime_pb2.ExpertRequest(uid=uid, tensors=[chunk])
        for tensor in tensors
        for chunk in split_for_streaming(serialize_torch_tensor(tensor), chunk_size_bytes=1024)
    ]


async def as_stream(requests: Iterable[runtime_pb2.ExpertRequest]) -> AsyncIterator[runtime_pb2.ExpertRequest]:
    for request in requests:
        yield request


async def good_forward(stub, uid: str = UID, batch: int = 3) -> torch.Tensor:
    """A well-formed forward call; returns the output (asserting its shape)."""
    response = await stub.rpc_forward(make_request(uid, torch.randn(batch, HIDDEN)), timeout=30)
    (output,) = [deserialize_torch_tensor(tensor) for tensor in response.tensors]
    assert output.shape == (batch, HIDDEN)
    return output


def parameters_of(server: Server, uid: str = UID) -> List[torch.Tensor]:
    backend = server.module_backends[uid]
    with backend._update_lock:
        return [parameter.detach().clone() for parameter in backend.module.parameters()]


def peak_rss() -> int:
    """The highest resident memory of this process so far, in bytes (Linux reports it in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


async def drain(responses) -> None:
    async for _ in responses:
        pass


async def sleep_forever_after(requests: Iterable[runtime_pb2.ExpertRequest], stalled: asyncio.Event):
    """A slow-loris input: sends the given messages, then never ends the stream."""
    for request in requests:
        yield request
    stalled.set()
    await asyncio.Event().wait()


class PreEncoded:
    """A unary answer given as its wire bytes (a handler returns it in place of a protobuf message)."""

    def __init__(self, data: bytes):
        self.data = data

    def SerializeToString(self) -> bytes:  # noqa: N802 (protobuf's name)
        return self.data


def answering_bytes(data: bytes) -> Tuple[Callable, Callable]:
    """``(unary, streaming)`` handlers of a hostile expert server: each answers a forward call with ``data`` as one
    wire message (the streaming one after reading the whole request)."""

    async def unary(_request, _context):
        return PreEncoded(data)

    async def streaming(requests, _context):
        async for _ in requests:
            pass
        yield EncodedMessage([data])

    return unary, streaming


async def serve_fake_expert(p2p_pair, **handlers: Callable):
    """Serve ``handlers`` (by RPC name, e.g. ``rpc_forward=...``; a name ending in ``_stream`` streams both ways) as
    the expert RPCs of the first peer of ``p2p_pair``; returns the second peer's stub of them."""
    server, client = p2p_pair
    for name, handler in handlers.items():
        streams = name.endswith("_stream")
        await server.add_protobuf_handler(
            f"ConnectionHandler.{name}",
            handler,
            runtime_pb2.ExpertRequest,
            stream_input=streams,
            stream_output=streams,
        )
    return ExpertRPCs.get_stub(client, server.peer_id)


async def forward_to_fake_expert(stub, inputs: torch.Tensor, timeout: Optional[float] = None):
    """Forward ``inputs`` to expert.0 through ``stub`` as RemoteExpert does: an answer may be as large as the input."""
    limit = response_size_limit(inputs.numel() * 4)
    return await call_expert(
        stub, "forward", UID, [serialize_torch_tensor(inputs)], raw_size_of([inputs]), timeout, limit, 1
    )
