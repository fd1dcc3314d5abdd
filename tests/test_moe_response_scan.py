"""A hostile expert server cannot make a client parse millions of empty tensors: responses are counted on the wire
before protobuf parses them, and streamed answers are limited to one chunk per message."""

import pytest
import torch
from moe_hostile_helpers import answering_bytes, peak_rss, serve_fake_expert

from hivemind.compression import serialize_torch_tensor
from hivemind.moe.client.expert_rpc import ExpertResponseTooLarge, call_expert, raw_size_of

EMPTY_TENSORS = 2_000_000  # 4 MB on the wire: within the 4 MiB limit of unary messages
BLOATED = b"\x12\x00" * EMPTY_TENSORS


@pytest.fixture
async def hostile_server(p2p_pair):
    unary, streaming = answering_bytes(BLOATED)
    return await serve_fake_expert(p2p_pair, rpc_forward=unary, rpc_forward_stream=streaming)


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
