"""Answers that are malformed rather than large get their own error, MalformedExpertResponse, whose message names the
problem and says what to do; it still derives from ExpertResponseTooLarge (what earlier versions raised for them)."""

import pytest
import torch
from moe_hostile_helpers import drain, forward_to_fake_expert, serve_fake_expert

from hivemind.compression import serialize_torch_tensor
from hivemind.moe.client.expert import check_grad_inputs
from hivemind.moe.client.expert_rpc import (
    ExpertResponseTooLarge,
    MalformedExpertResponse,
)
from hivemind.p2p.framing import EncodedMessage
from hivemind.proto import runtime_pb2
from hivemind.utils.streaming import split_for_streaming

HIDDEN = 1024
STREAMED_ROWS = 1024  # 4 MiB of input: above the unary limit, so the call streams
ADVICE = "does not follow the expert protocol"


async def call_forward(stub, rows: int):
    return await forward_to_fake_expert(stub, torch.randn(rows, HIDDEN), timeout=30)


def answer_of(rows: int) -> runtime_pb2.Tensor:
    return serialize_torch_tensor(torch.ones(rows, HIDDEN))


async def undecodable_answer(request, _context):
    tensor = answer_of(1)
    tensor.buffer = tensor.buffer[:-4]  # one element short of its shape
    return runtime_pb2.ExpertResponse(tensors=[tensor])


async def empty_answer(_request, _context):
    return runtime_pb2.ExpertResponse()


async def streamed_answer_cut_short(requests, _context):
    await drain(requests)
    chunks = list(split_for_streaming(answer_of(STREAMED_ROWS), 1024**2))
    assert chunks[0].chunks == 4
    for chunk in chunks[:2]:  # then the server "dies": the stream ends without the last two chunks
        yield runtime_pb2.ExpertResponse(tensors=[chunk])


async def streamed_answer_with_extra_chunks(requests, _context):
    await drain(requests)
    chunks = list(split_for_streaming(answer_of(STREAMED_ROWS), 1024**2))
    for chunk in chunks + chunks[1:2]:
        yield runtime_pb2.ExpertResponse(tensors=[chunk])


async def streamed_answer_without_metadata(requests, _context):
    await drain(requests)
    yield runtime_pb2.ExpertResponse(tensors=[runtime_pb2.Tensor(buffer=b"\x00" * 16)])


async def streamed_answer_of_two_tensors(requests, _context):
    await drain(requests)
    for _ in range(2):
        yield runtime_pb2.ExpertResponse(tensors=[runtime_pb2.Tensor(dtype="float32", size=[0])])


async def endless_empty_chunks(requests, _context):
    await drain(requests)
    yield runtime_pb2.ExpertResponse(tensors=[runtime_pb2.Tensor(dtype="float32", size=[STREAMED_ROWS, HIDDEN])])
    empty = EncodedMessage([b"\x12\x00"])
    for _ in range(40_000):
        yield empty


async def unparsable_answer(requests, _context):
    await drain(requests)
    yield EncodedMessage([b"\x12\x04\x22\x02\xfe\xff"])  # the dtype of its tensor is not UTF-8


def test_malformed_answers_are_still_caught_as_the_error_earlier_versions_raised():
    assert issubclass(MalformedExpertResponse, ExpertResponseTooLarge)
    assert issubclass(MalformedExpertResponse, RuntimeError)


@pytest.mark.timeout(60)
async def test_unary_answer_whose_tensor_does_not_decode(p2p_pair):
    stub = await serve_fake_expert(p2p_pair, rpc_forward=undecodable_answer)
    with pytest.raises(MalformedExpertResponse, match=f"tensor #0 could not be decoded .*{ADVICE}"):
        await call_forward(stub, 1)


@pytest.mark.timeout(60)
async def test_answer_with_fewer_tensors_than_the_expert_returns(p2p_pair):
    stub = await serve_fake_expert(p2p_pair, rpc_forward=empty_answer)
    with pytest.raises(
        MalformedExpertResponse, match=f"expert.0 sent a malformed answer to forward: 0 tensors instead of 1.*{ADVICE}"
    ):
        await call_forward(stub, 1)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "handler, match",
    [
        (streamed_answer_cut_short, "tensor #0 ended after 2 of the 4 chunks it announced"),
        (streamed_answer_with_extra_chunks, "tensor #0 got more chunks than the 4 it announced"),
        (streamed_answer_without_metadata, "continuation chunk came before any tensor metadata"),
    ],
    ids=["cut-short-names-the-missing-chunks", "more-chunks-than-announced", "starts-without-metadata"],
)
async def test_streamed_answer_with_broken_chunking_is_malformed(p2p_pair, handler, match):
    stub = await serve_fake_expert(p2p_pair, rpc_forward_stream=handler)
    with pytest.raises(MalformedExpertResponse, match=match):
        await call_forward(stub, STREAMED_ROWS)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "handler, match",
    [
        (streamed_answer_of_two_tensors, "expects 1 tensors, got more"),
        (unparsable_answer, "not a valid expert message"),
    ],
    ids=["too-many-tensors", "unparsable"],
)
async def test_answers_refused_on_the_wire_are_malformed_not_too_large(p2p_pair, handler, match):
    stub = await serve_fake_expert(p2p_pair, rpc_forward_stream=handler)
    with pytest.raises(MalformedExpertResponse, match=f"{match}.*{ADVICE}"):
        await call_forward(stub, STREAMED_ROWS)


@pytest.mark.timeout(60)
async def test_oversized_answer_is_too_large_not_malformed(p2p_pair):
    stub = await serve_fake_expert(p2p_pair, rpc_forward_stream=endless_empty_chunks)
    with pytest.raises(ExpertResponseTooLarge, match="more than it can need") as error:
        await call_forward(stub, STREAMED_ROWS)
    assert not isinstance(error.value, MalformedExpertResponse)


def test_gradients_that_do_not_match_the_inputs_are_malformed():
    inputs = [torch.ones(2, 3)]
    with pytest.raises(MalformedExpertResponse, match=r"gradient of shape \(2, 4\) for input 0 of shape \(2, 3\)"):
        check_grad_inputs("expert.0", inputs, [torch.ones(2, 4)])
    with pytest.raises(MalformedExpertResponse, match="2 gradients for 1 inputs"):
        check_grad_inputs("expert.0", inputs, [torch.ones(2, 3)] * 2)
