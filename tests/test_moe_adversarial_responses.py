"""A hostile expert server answering a streamed call with endless tiny messages: the client keeps every message until
the stream ends, so each one counts against the answer's byte budget, and tensors are counted across the stream."""

import pytest
import torch
from moe_hostile_helpers import answering_bytes, drain, forward_to_fake_expert, serve_fake_expert

from hivemind.moe.client.expert_rpc import ExpertResponseTooLarge
from hivemind.p2p.framing import EncodedMessage
from hivemind.proto import runtime_pb2

ROWS, HIDDEN = 1024, 1024  # 4 MiB of input: above the unary limit, so the call streams
EMPTY_CHUNKS = 40_000  # two bytes each on the wire, a few hundred bytes each once parsed by the client
# announces no chunk count (0), so that only the byte budget can stop the chunks that follow
HEAD = runtime_pb2.Tensor(dtype="float32", size=[ROWS, HIDDEN], chunks=0)


async def endless_empty_chunks(requests, _context):
    """A valid answer (one float32 tensor of the input's shape) with tens of thousands of empty chunks inside."""
    await drain(requests)
    yield runtime_pb2.ExpertResponse(tensors=[HEAD])
    empty = EncodedMessage([b"\x12\x00"])  # one continuation chunk without bytes
    for _ in range(EMPTY_CHUNKS):
        yield empty
    yield runtime_pb2.ExpertResponse(tensors=[runtime_pb2.Tensor(buffer=bytes(4 * ROWS * HIDDEN))])


async def one_new_tensor_per_message(requests, _context):
    await drain(requests)
    for _ in range(1000):
        yield runtime_pb2.ExpertResponse(tensors=[runtime_pb2.Tensor(dtype="float32", size=[0])])


NOT_AN_ANSWER = b"\x12\x04\x22\x02\xfe\xff"  # fields that scan well, but the dtype of its tensor is not UTF-8


async def call_forward(stub, rows: int = ROWS):
    return await forward_to_fake_expert(stub, torch.randn(rows, HIDDEN))


@pytest.mark.timeout(60)
async def test_streamed_answer_of_endless_empty_chunks_is_refused(p2p_pair):
    stub = await serve_fake_expert(p2p_pair, rpc_forward_stream=endless_empty_chunks)
    with pytest.raises(ExpertResponseTooLarge, match="more than it can need"):
        await call_forward(stub)


@pytest.mark.timeout(60)
async def test_streamed_answer_with_more_tensors_than_outputs_is_refused(p2p_pair):
    stub = await serve_fake_expert(p2p_pair, rpc_forward_stream=one_new_tensor_per_message)
    with pytest.raises(ExpertResponseTooLarge, match="expects 1 tensors, got more"):
        await call_forward(stub)


@pytest.mark.parametrize("rows, name", [(1, "rpc_forward"), (ROWS, "rpc_forward_stream")], ids=["unary", "stream"])
async def test_answer_that_protobuf_cannot_parse_is_refused_clearly(p2p_pair, rows, name):
    unary, streaming = answering_bytes(NOT_AN_ANSWER)
    stub = await serve_fake_expert(p2p_pair, **{name: unary if name == "rpc_forward" else streaming})
    with pytest.raises(ExpertResponseTooLarge, match="not a valid expert message"):
        await call_forward(stub, rows)
