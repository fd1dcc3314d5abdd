"""Cutting tensors into all-reduce parts and reducing them (no network)."""

import asyncio

import pytest
import torch

from hivemind.averaging.partition import (
    AllreduceException,
    BannedException,
    TensorPartContainer,
    TensorPartReducer,
    plan_parts,
)
from hivemind.compression import Float16Compression, deserialize_torch_tensor
from hivemind.proto import runtime_pb2


def test_parts_never_cross_tensors_and_have_the_part_size():
    parts = plan_parts([10, 7], [4, 4], [17])
    expected = [(0, 0, 4), (0, 4, 8), (0, 8, 10), (1, 0, 4), (1, 4, 7)]
    assert [(p.tensor_index, p.start, p.stop) for p in parts] == expected
    assert [p.index for p in parts] == [0, 1, 2, 3, 4] and all(p.reducer == 0 for p in parts)


def test_a_straddling_part_goes_to_the_peer_with_the_largest_overlap_earliest_on_ties():
    # peer ranges: [0, 5), [5, 12), [12, 20); parts of 4 elements: [0,4) [4,8) [8,12) [12,16) [16,20)
    parts = plan_parts([20], [4], [5, 7, 8])
    assert [p.reducer for p in parts] == [0, 1, 1, 2, 2]
    # [0,6) [6,12): ranges [0,3) [3,9) [9,12): the first part overlaps peers 0 and 1 by 3 each -> peer 0
    assert [p.reducer for p in plan_parts([12], [6], [3, 6, 3])] == [0, 1]


def test_peers_with_zero_share_get_no_parts():
    parts = plan_parts([8], [2], [4, 0, 4])
    assert [p.reducer for p in parts] == [0, 0, 2, 2]


def test_part_size_accounts_for_the_compression_ratio():
    tensors = [torch.randn(1000)]
    plain = TensorPartContainer(tensors, [1.0], part_size_bytes=400)
    halved = TensorPartContainer(tensors, [1.0], part_size_bytes=400, compression=Float16Compression())
    assert plain.part_sizes == [100] and halved.part_sizes == [200]


async def test_container_sends_compressed_parts_and_reassembles_deltas_per_tensor():
    tensors = [torch.randn(3, 5), torch.randn(7), torch.randn(0)]
    container = TensorPartContainer(tensors, [1.0, 1.0], part_size_bytes=16)  # 4 float32 elements per part
    flat = torch.cat([t.reshape(-1) for t in tensors])
    assert container.peer_element_counts == (11, 11)
    sent = []
    for peer in (0, 1):
        async for message in container.iterate_input_parts_for(peer):
            assert isinstance(message, runtime_pb2.Tensor)
            sent.append(deserialize_torch_tensor(message))
    assert torch.equal(torch.cat(sent), flat)  # parts of both peers cover the vector in order
    for peer in (0, 1):
        for index, part in enumerate(container.parts_by_peer[peer]):
            container.register_processed_part(peer, index, torch.full((part.numel,), float(peer + 1)))
    deltas = [delta async for delta in container.iterate_output_tensors()]
    assert [d.shape for d in deltas] == [t.shape for t in tensors]
    expected = torch.cat([torch.full((p.numel,), float(p.reducer + 1)) for p in container.parts])
    assert torch.equal(torch.cat([d.reshape(-1) for d in deltas]), expected)


async def test_failed_reducer_parts_get_zero_deltas():
    container = TensorPartContainer([torch.randn(8)], [1.0, 1.0], part_size_bytes=8)
    container.register_processed_part(0, 0, torch.ones(2))
    assert container.register_failed_reducer(0) == 1
    assert container.register_failed_reducer(1) == 2
    (delta,) = [d async for d in container.iterate_output_tensors()]
    assert delta.tolist() == [1, 1, 0, 0, 0, 0, 0, 0]


async def test_reducer_computes_the_weighted_average_of_every_part():
    reducer = TensorPartReducer([(3,), (2,)], num_senders=3)
    values = [torch.randn(5) for _ in range(3)]
    weights = [1.0, 2.0, 0.5]

    async def sender(i):
        first = await reducer.accumulate_part(i, 0, values[i][:3], weights[i])
        second = await reducer.accumulate_part(i, 1, values[i][3:], weights[i])
        return torch.cat([first, second])

    results = await asyncio.gather(*(sender(i) for i in range(3)))
    expected = sum(w * v for w, v in zip(weights, values)) / sum(weights)
    for result in results:
        torch.testing.assert_close(result, expected)
    assert reducer.finished.is_set()


async def test_reducer_with_zero_total_weight_returns_none():
    reducer = TensorPartReducer([(2,)], num_senders=2)
    results = await asyncio.gather(*(reducer.accumulate_part(i, 0, torch.ones(2), 0.0) for i in range(2)))
    assert results == [None, None]


async def test_banned_sender_is_excluded_from_parts_it_did_not_deliver():
    reducer = TensorPartReducer([(1,), (1,)], num_senders=3)
    futures = [await reducer.submit_part(i, 0, torch.tensor([float(i)])) for i in range(3)]
    later = [await reducer.submit_part(i, 1, torch.tensor([10.0 * i])) for i in range(2)]
    assert not later[0].done()  # waits for sender 2
    assert reducer.ban_sender(2, "test")
    assert (await futures[0]).item() == pytest.approx(1.0)  # part 0 includes sender 2
    assert (await later[0]).item() == pytest.approx(5.0)  # part 1 does not
    with pytest.raises(BannedException):
        await reducer.submit_part(2, 1, torch.tensor([1.0]))


async def test_a_part_of_the_wrong_size_or_order_bans_its_sender():
    reducer = TensorPartReducer([(2,), (2,)], num_senders=2)
    with pytest.raises(AllreduceException, match="elements"):
        await reducer.submit_part(0, 0, torch.ones(3))
    assert not reducer.is_active(0)
    with pytest.raises(AllreduceException, match="expected part 0"):
        await reducer.submit_part(1, 1, torch.ones(2))
    assert not reducer.is_active(1) and reducer.finished.is_set()
    with pytest.raises(AllreduceException, match="elements of torch.float64"):
        await TensorPartReducer([(2,)], 1).submit_part(0, 0, torch.ones(2, dtype=torch.float64))


async def test_a_fast_sender_waits_for_the_window():
    reducer = TensorPartReducer([(1,)] * 4, num_senders=2, window=2)
    await reducer.submit_part(0, 0, torch.ones(1))
    await reducer.submit_part(0, 1, torch.ones(1))
    third = asyncio.ensure_future(reducer.submit_part(0, 2, torch.ones(1)))
    await asyncio.sleep(0.01)
    assert not third.done()  # part 2 is beyond the window until part 0 is released
    await reducer.submit_part(1, 0, torch.ones(1))
    await asyncio.wait_for(third, 1)


async def test_finalize_fails_waiting_callers():
    reducer = TensorPartReducer([(1,)], num_senders=2)
    future = await reducer.submit_part(0, 0, torch.ones(1))
    reducer.finalize()
    with pytest.raises(AllreduceException):
        await future
