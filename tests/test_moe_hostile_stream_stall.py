"""A hostile expert server that reads a streamed forward call and never answers must not hold the client
forever. A unary call is bounded by the P2P's unary_call_timeout; a streamed answer's every message now is too
(RemoteExpert and RemoteMixtureOfExperts call without a timeout of their own)."""

import asyncio
import time

import pytest
import torch
from moe_hostile_helpers import drain, forward_to_fake_expert, serve_fake_expert

from hivemind.moe.client import expert_rpc
from hivemind.p2p import P2PTimeoutError, framing
from hivemind.proto import runtime_pb2

pytestmark = pytest.mark.timeout(30)
ROWS, HIDDEN = 1024, 1024  # 4 MiB of input: above the unary limit, so the call streams


async def reads_and_never_answers(requests, _context):
    await drain(requests)
    await asyncio.Event().wait()
    yield runtime_pb2.ExpertResponse()


async def answers_one_chunk_and_stalls(requests, _context):
    await drain(requests)
    yield runtime_pb2.ExpertResponse(tensors=[runtime_pb2.Tensor(dtype="float32", size=[ROWS, HIDDEN], chunks=2)])
    await asyncio.Event().wait()


@pytest.mark.parametrize("handler", [reads_and_never_answers, answers_one_chunk_and_stalls], ids=["silent", "stalled"])
async def test_a_streamed_answer_that_stops_coming_fails_within_the_unary_call_timeout(p2p_pair, handler):
    client = p2p_pair[1]
    client.unary_call_timeout = 1.5
    stub = await serve_fake_expert(p2p_pair, rpc_forward_stream=handler)
    started = time.monotonic()
    with pytest.raises(P2PTimeoutError, match="expert.0"):
        await asyncio.wait_for(forward_to_fake_expert(stub, torch.randn(ROWS, HIDDEN)), 20)
    assert time.monotonic() - started < 10


async def drips_empty_chunks(requests, _context):
    await drain(requests)
    yield runtime_pb2.ExpertResponse(tensors=[runtime_pb2.Tensor(dtype="float32", size=[ROWS, HIDDEN], chunks=0)])
    while True:
        await asyncio.sleep(0.2)  # well within the timeout each time
        yield runtime_pb2.ExpertResponse(tensors=[runtime_pb2.Tensor()])


async def test_a_streamed_answer_dripping_within_the_timeout_must_still_complete_in_time(p2p_pair, monkeypatch):
    monkeypatch.setattr(expert_rpc, "MIN_ANSWER_RATE", 2**40)  # the budget's bytes take no time: only the timeout
    client = p2p_pair[1]
    client.unary_call_timeout = 1.5
    stub = await serve_fake_expert(p2p_pair, rpc_forward_stream=drips_empty_chunks)
    started = time.monotonic()
    with pytest.raises(P2PTimeoutError, match="did not complete in time"):
        await asyncio.wait_for(forward_to_fake_expert(stub, torch.randn(ROWS, HIDDEN)), 20)
    assert time.monotonic() - started < 10


async def never_reads(_requests, _context):
    await asyncio.Event().wait()
    yield runtime_pb2.ExpertResponse()


async def test_a_server_that_never_takes_a_streamed_input_fails_the_call_once_the_input_stalls(p2p_pair, monkeypatch):
    monkeypatch.setattr(framing, "FRAME_STALL_TIMEOUT", 1.0)  # a message's bytes must be taken within ~1 s
    monkeypatch.setattr(framing, "MIN_FRAME_RATE", 2**30)
    stub = await serve_fake_expert(p2p_pair, rpc_forward_stream=never_reads)
    started = time.monotonic()
    # (before, the call waited for the input to be sent whole, forever: the timeout counts only from then)
    with pytest.raises(P2PTimeoutError, match="took no more of the input"):
        await asyncio.wait_for(forward_to_fake_expert(stub, torch.randn(16 * ROWS, HIDDEN)), 20)  # 64 MiB
    assert time.monotonic() - started < 10
