"""AllReduceRunner between real p2pd peers on 127.0.0.1: exact averages, weights, modes, compression on the wire."""

import os

import pytest
import torch
from allreduce_helpers import AllreduceRouter, make_connected_peers, run_group, start_routers

from hivemind.averaging.allreduce import AllReduceRunner, AveragingMode
from hivemind.compression import Float16Compression
from hivemind.proto import runtime_pb2

pytestmark = pytest.mark.timeout(60)


def weighted_average(tensors_by_peer, weights):
    total = sum(weights)
    return [
        sum(w * tensors[i] for w, tensors in zip(weights, tensors_by_peer)) / total
        for i in range(len(tensors_by_peer[0]))
    ]


def random_tensors(seed):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(17, generator=generator), torch.randn(3, 101, generator=generator), torch.randn(1)]


@pytest.mark.parametrize(
    "num_peers, weights, fractions",
    [
        (2, [1.0, 1.0], [1, 1]),
        (3, [1.0, 2.0, 0.5], [1, 2, 3]),
        (4, [0.3, 1.0, 4.0, 2.5], [0.1, 0.4, 0.2, 0.3]),
        (4, [1.0, 1.0, 1.0, 1.0], [5, 0, 1, 2]),  # a member with no share (a client) still gets the average
    ],
)
async def test_every_member_gets_the_exact_weighted_average(p2p_factory, num_peers, weights, fractions):
    peers = await make_connected_peers(p2p_factory, num_peers)
    routers = await start_routers(peers)
    tensors = [random_tensors(seed) for seed in range(num_peers)]
    deltas = await run_group(
        peers,
        routers,
        tensors,
        peer_fractions=fractions,
        part_size_bytes=64,  # many small parts, so that every member reduces several
        per_peer_kwargs=[dict(weight=w) for w in weights],
    )
    expected = weighted_average(tensors, weights)
    for own, own_deltas in zip(tensors, deltas):
        assert len(own_deltas) == len(own)
        for local, delta, average in zip(own, own_deltas, expected):
            assert delta.shape == local.shape
            torch.testing.assert_close(local + delta, average, rtol=0, atol=1e-5)


async def test_zero_weight_member_does_not_influence_the_average(p2p_factory):
    peers = await make_connected_peers(p2p_factory, 3)
    tensors = [random_tensors(seed) for seed in range(3)]
    deltas = await run_group(
        peers, await start_routers(peers), tensors, per_peer_kwargs=[dict(weight=w) for w in (1.0, 0.0, 3.0)]
    )
    expected = weighted_average([tensors[0], tensors[2]], [1.0, 3.0])
    for own, own_deltas in zip(tensors, deltas):
        for local, delta, average in zip(own, own_deltas, expected):
            torch.testing.assert_close(local + delta, average, rtol=0, atol=1e-5)


async def test_aux_member_reduces_but_neither_sends_nor_receives(p2p_factory):
    peers = await make_connected_peers(p2p_factory, 3)
    routers = await start_routers(peers)
    tensors = [random_tensors(seed) for seed in range(3)]
    modes = [AveragingMode.NODE, AveragingMode.AUX, AveragingMode.NODE]
    deltas = await run_group(peers, routers, tensors, modes=modes, peer_fractions=[1, 4, 1], part_size_bytes=64)
    assert deltas[1] == []  # AUX peers get nothing back
    expected = weighted_average([tensors[0], tensors[2]], [1.0, 1.0])  # and their tensors do not count
    for peer in (0, 2):
        for local, delta, average in zip(tensors[peer], deltas[peer], expected):
            torch.testing.assert_close(local + delta, average, rtol=0, atol=1e-5)


async def test_client_member_gets_its_replies_after_it_finished_sending(p2p_factory):
    peers = await make_connected_peers(p2p_factory, 2)
    routers = await start_routers(peers)
    tensors = [random_tensors(seed) for seed in range(2)]
    modes = [AveragingMode.NODE, AveragingMode.CLIENT]
    deltas = await run_group(peers, routers, tensors, modes=modes, peer_fractions=[1, 0], part_size_bytes=64)
    expected = weighted_average(tensors, [1.0, 1.0])
    for own, own_deltas in zip(tensors, deltas):
        for local, delta, average in zip(own, own_deltas, expected):
            torch.testing.assert_close(local + delta, average, rtol=0, atol=1e-5)


async def test_parts_travel_in_the_senders_compression(p2p_factory, monkeypatch):
    peers = await make_connected_peers(p2p_factory, 2)
    routers = await start_routers(peers)
    seen_types = []
    original = AllReduceRunner._decode

    async def spying_decode(self, message, part, what):
        seen_types.append(message.tensor_part.compression)
        return await original(self, message, part, what)

    monkeypatch.setattr(AllReduceRunner, "_decode", spying_decode)
    tensors = [[torch.randn(1000) * 10] for _ in range(2)]
    deltas = await run_group(peers, routers, tensors, compression=Float16Compression(), part_size_bytes=512)
    assert seen_types and set(seen_types) == {runtime_pb2.CompressionType.FLOAT16}  # parts and deltas alike
    expected = weighted_average(tensors, [1.0, 1.0])
    for own, own_deltas in zip(tensors, deltas):
        torch.testing.assert_close(own[0] + own_deltas[0], expected[0], rtol=0, atol=2e-2)


async def test_repeated_rounds_reuse_the_same_peers(p2p_factory):
    peers = await make_connected_peers(p2p_factory, 2)
    routers = await start_routers(peers)
    tensors = [[torch.randn(4096)] for _ in range(2)]
    for _ in range(3):
        deltas = await run_group(peers, routers, tensors, group_id=os.urandom(20))
        for own, own_deltas in zip(tensors, deltas):
            own[0].add_(own_deltas[0])
    torch.testing.assert_close(tensors[0][0], tensors[1][0])


async def test_reducer_timeout_must_exceed_sender_timeout(p2p_factory):
    (peer,) = await make_connected_peers(p2p_factory, 1)
    with pytest.raises(ValueError, match="reducer_timeout"):
        AllReduceRunner(
            p2p=peer,
            servicer_type=AllreduceRouter,
            prefix="x",
            group_id=b"g",
            tensors=[torch.zeros(3)],
            ordered_peer_ids=[peer.peer_id],
            peer_fractions=[1.0],
            sender_timeout=2.0,
            reducer_timeout=2.0,
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.int64, torch.int8])
def test_parts_encoded_from_tensor_memory_are_byte_identical_to_protobuf(dtype):
    from hivemind.averaging.part_encoding import encode_averaging_data
    from hivemind.compression import CompressionInfo, NoCompression
    from hivemind.proto import averaging_pb2

    tensor = (torch.randn(1000) * 100).to(dtype)
    for code, group_id, weight in ((averaging_pb2.PART_FOR_AVERAGING, os.urandom(20), 1.5), (0, b"", 0.0)):
        encoded = b"".join(bytes(part) for part in encode_averaging_data(tensor, code=code, group_id=group_id,
                                                                         weight=weight).parts)  # fmt: skip
        reference = averaging_pb2.AveragingData(code=code, group_id=group_id, weight=weight)
        reference.tensor_part.CopyFrom(NoCompression().compress(tensor, CompressionInfo.from_tensor(tensor)))
        assert encoded == reference.SerializeToString()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64, torch.int64])
async def test_tensors_of_other_dtypes_average_to_the_same_values(p2p_factory, dtype):
    peers = await make_connected_peers(p2p_factory, 3)
    routers = await start_routers(peers)
    tensors = [[(torch.arange(40) * (i + 1)).to(dtype), torch.zeros(0, dtype=dtype)] for i in range(3)]
    deltas = await run_group(peers, routers, tensors, part_size_bytes=16)
    # (applied in place as the averager does: a float16/bfloat16 part's delta is float32)
    results = [own[0].clone().add_(own_deltas[0]) for own, own_deltas in zip(tensors, deltas)]
    expected = (torch.arange(40, dtype=torch.float64) * 2).to(dtype)  # the mean of 1x, 2x and 3x
    for result, own_deltas in zip(results, deltas):
        assert result.dtype == dtype and own_deltas[1].shape == (0,)
        torch.testing.assert_close(result, expected, rtol=1e-2, atol=0)
