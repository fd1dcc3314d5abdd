"""A hostile expert server cannot make a client parse millions of empty tensors: responses are counted on the wire
before protobuf parses them, and streamed answers are limited to one chunk per message."""

import resource

import pytest
import torch

from hivemind.compression import serialize_torch_tensor
from hivemind.moe.client.expert_rpc import ConnectionHandler, ExpertResponseTooLarge, call_expert, raw_size_of
from hivemind.p2p.framing import EncodedMessage
from hivemind.proto import runtime_pb2

EMPTY_TENSORS = 2_000_000  # 4 MB on the wire: within the 4 MiB limit of unary messages
BLOATED = b"\x12\x00" * EMPTY_TENSORS


class PreEncoded:
    """A unary response given as wire bytes."""

    def __init__(self, data: bytes):
        self.data = data

    def SerializeToString(self) -> bytes:  # noqa: N802 (protobuf's name)
        return self.data


async def bloated_forward(_request, _context):
    return PreEncoded(BLOATED)


async def bloated_forward_stream(requests, _context):
    async for _ in requests:
        pass
    yield EncodedMessage([BLOATED])


@pytest.fixture
async def hostile_server(p2p_pair):
    server, client = p2p_pair
    await server.add_protobuf_handler("ConnectionHandler.rpc_forward", bloated_forward, runtime_pb2.ExpertRequest)
    await server.add_protobuf_handler(
        "ConnectionHandler.rpc_forward_stream",
        bloated_forward_stream,
        runtime_pb2.ExpertRequest,
        stream_input=True,
        stream_output=True,
    )
    return ConnectionHandler.get_stub(client, server.peer_id)


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


async def call_forward(stub, x: torch.Tensor):
    serialized = [serialize_torch_tensor(x)]
    return await call_expert(stub, "forward", "expert.0", serialized, raw_size_of([x]), 30, 2**30, 1)


@pytest.mark.timeout(60)
async def test_unary_answer_of_millions_of_empty_tensors_is_refused_before_parsing(hostile_server):
    before = peak_rss()
    with pytest.raises(ExpertResponseTooLarge, match="expects 1 tensors, got more"):
        await call_forward(hostile_server, torch.randn(2, 4))
    growth = peak_rss() - before
    assert growth < 64 * 1024**2, f"the client's memory peaked {growth / 2**20:.0f} MiB higher"


@pytest.mark.timeout(60)
async def test_streamed_answer_of_millions_of_empty_tensors_is_refused_before_parsing(hostile_server):
    before = peak_rss()
    with pytest.raises(ExpertResponseTooLarge, match="expects 1 tensors, got more"):
        await call_forward(hostile_server, torch.randn(1024, 1024))  # 4 MiB of input: the streaming variant
    growth = peak_rss() - before
    assert growth < 64 * 1024**2, f"the client's memory peaked {growth / 2**20:.0f} MiB higher"
