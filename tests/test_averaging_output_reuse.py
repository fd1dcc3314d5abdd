"""Memory that all-reduce rounds reuse instead of allocating: the output of the previous round (once the caller
dropped it), and a received part's own buffer for the delta sent back."""

import asyncio
import os

import numpy as np
import pytest
import torch
from allreduce_helpers import collect, make_connected_peers, make_runner, start_routers

from hivemind.averaging.output_buffers import ReusableOutputs
from hivemind.averaging.part_encoding import (
    ReceivedAveragingData,
    encode_averaging_data,
    encode_delta,
    is_private_view,
    refuse_non_finite,
)
from hivemind.averaging.partition import AllreduceException, TensorPartContainer
from hivemind.compression import CompressionInfo, serialize_torch_tensor
from hivemind.proto import averaging_pb2, runtime_pb2

MiB = 2**20
NUMEL = MiB  # 4 MiB of float32: above ReusableOutputs' min_bytes


def test_an_output_the_caller_dropped_is_handed_out_again():
    outputs = ReusableOutputs()
    first = outputs.take(0, NUMEL, torch.float32)
    address = first.data_ptr()
    del first
    again = outputs.take(0, NUMEL, torch.float32)
    assert again.data_ptr() == address
    assert (outputs.allocated, outputs.reused) == (1, 1)


@pytest.mark.parametrize("holder", ["tensor", "view", "numpy"])
def test_an_output_still_referenced_is_never_reused(holder):
    outputs = ReusableOutputs()
    output = outputs.take(0, NUMEL, torch.float32)
    output.fill_(1.0)
    held = {"tensor": output, "view": output.view(2, -1)[1], "numpy": output.numpy()}[holder]
    del output
    other = outputs.take(0, NUMEL, torch.float32)
    other.fill_(2.0)
    assert np.all(np.asarray(held) == 1.0)  # what the caller holds is untouched
    assert outputs.allocated == 2 and outputs.reused == 0


def test_the_pool_keeps_at_most_one_buffer_per_tensor_over_many_rounds():
    outputs = ReusableOutputs()
    held = []
    for round_index in range(1000):
        deltas = [outputs.take(slot, NUMEL // 4, torch.float32) for slot in range(2)]
        if round_index % 3 == 0:
            held = deltas  # the caller keeps some rounds' outputs past the next round
        del deltas
    assert outputs.nbytes <= 2 * NUMEL  # two slots of NUMEL // 4 float32 elements
    assert outputs.reused > 0 and held


def test_small_outputs_and_other_shapes_get_fresh_memory():
    outputs = ReusableOutputs()
    outputs.take(0, 16, torch.float32)
    assert outputs.nbytes == 0  # small outputs are not kept
    outputs.take(1, NUMEL, torch.float32)
    assert outputs.take(1, NUMEL, torch.float64).dtype == torch.float64  # replaces the slot
    assert outputs.nbytes == NUMEL * 8
    outputs.clear()
    assert outputs.nbytes == 0


@pytest.mark.timeout(60)
async def test_consecutive_rounds_write_into_the_previous_rounds_output(p2p_factory):
    peers = await make_connected_peers(p2p_factory, 2)
    routers = await start_routers(peers)
    pools = [ReusableOutputs() for _ in peers]
    tensors = [[torch.randn(NUMEL)] for _ in peers]
    addresses = []
    for _ in range(2):
        group_id = os.urandom(20)
        runners = [
            make_runner(peer, router, peers, group_id, peer_tensors, output_buffers=pool)
            for peer, router, peer_tensors, pool in zip(peers, routers, tensors, pools)
        ]
        deltas = await asyncio.gather(*(collect(runner) for runner in runners))
        expected = (tensors[0][0] + tensors[1][0]) / 2
        for (delta,), (tensor,) in zip(deltas, tensors):
            assert torch.allclose(tensor + delta, expected, atol=1e-6)
        addresses.append([delta.data_ptr() for (delta,) in deltas])
        del deltas, delta, runners
    assert addresses[0] == addresses[1]
    assert [pool.reused for pool in pools] == [1, 1]


def _received(tensor: torch.Tensor, writable: bool = True) -> ReceivedAveragingData:
    """``tensor`` as a reducer receives it: a frame whose tensor buffer stays in the (writable) payload."""
    frame = b"".join(bytes(chunk) for chunk in encode_averaging_data(tensor, weight=1.0).parts)
    message = ReceivedAveragingData()
    message.ParseFromString(memoryview(bytearray(frame)) if writable else frame)
    return message


def test_only_a_writable_uncompressed_frame_is_a_private_view():
    values = torch.randn(2**17)
    assert is_private_view(_received(values))
    assert not is_private_view(_received(values, writable=False))
    compressed = averaging_pb2.AveragingData()
    compressed.tensor_part.CopyFrom(serialize_torch_tensor(values, runtime_pb2.CompressionType.FLOAT16))
    assert not is_private_view(compressed)


def test_a_delta_in_place_is_written_over_the_received_part():
    part, average = torch.randn(2**17), torch.randn(2**17)
    received = part.clone()
    info = CompressionInfo.from_tensor(part)
    reply = encode_delta(average, received, runtime_pb2.CompressionType.NONE, info, in_place=True)
    assert np.shares_memory(np.asarray(reply.parts[1]), received.numpy())
    assert torch.equal(received, average - part)
    fresh = encode_delta(average, part, runtime_pb2.CompressionType.NONE, info)
    assert not np.shares_memory(np.asarray(fresh.parts[1]), part.numpy())


async def test_a_delta_refused_after_it_was_stored_leaves_its_part_at_the_local_value():
    local = torch.randn(8)
    container = TensorPartContainer([local], [1.0, 1.0], part_size_bytes=8)
    container.register_processed_part(0, 0, torch.ones(2))
    bad = torch.tensor([1.0, float("nan")])
    with pytest.raises(AllreduceException, match="1 inf/NaN"):
        container.register_processed_part(
            0, 1, bad, check=lambda stored: refuse_non_finite(stored, local[2:4], what="delta 1")
        )
    assert container.register_failed_reducer(0) == 1 and container.register_failed_reducer(1) == 2
    (delta,) = [d async for d in container.iterate_output_tensors()]
    assert delta.tolist() == [1, 1, 0, 0, 0, 0, 0, 0]
