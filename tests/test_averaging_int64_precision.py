"""int64 tensors with values beyond 2**53 (where float64 has no integer step of 1) average exactly: equal values stay
as they are, and a mean halfway between two integers goes to the even one, on every member."""

import pytest
import torch
from allreduce_helpers import make_connected_peers, run_group, start_routers

from hivemind.averaging.partition import TensorPartReducer

BIG = 2**60 + 1  # float64 rounds it to 2**60


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "values, weights, expected",
    [
        ((BIG, BIG, BIG), (1.0, 1.0, 1.0), BIG),
        ((BIG, BIG + 3, BIG + 2), (1.0, 1.0, 1.0), BIG + 2),  # mean BIG + 5/3
        ((BIG, BIG + 3, BIG + 3), (1.0, 0.5, 0.5), BIG + 1),  # mean BIG + 1.5: to the even neighbour (BIG is odd)
        ((-BIG, -BIG - 1, -BIG - 1), (2.0, 1.0, 1.0), -BIG - 1),  # mean -BIG - 0.5: to the even neighbour
    ],
)
async def test_int64_values_beyond_float64_precision_average_exactly(p2p_factory, values, weights, expected):
    peers = await make_connected_peers(p2p_factory, 3)
    routers = await start_routers(peers)
    tensors = [[torch.full((3000,), value, dtype=torch.int64)] for value in values]
    deltas = await run_group(
        peers, routers, tensors, part_size_bytes=4096, per_peer_kwargs=[dict(weight=weight) for weight in weights]
    )
    for (local,), (delta,) in zip(tensors, deltas):
        assert torch.equal(local + delta, torch.full((3000,), expected, dtype=torch.int64))


@pytest.mark.timeout(60)
async def test_int64_values_too_far_apart_for_exact_offsets_still_average_to_one_value_near_the_mean(p2p_factory):
    peers = await make_connected_peers(p2p_factory, 3)
    routers = await start_routers(peers)
    low, high = torch.iinfo(torch.int64).min, torch.iinfo(torch.int64).max
    tensors = [[torch.full((3000,), value, dtype=torch.int64)] for value in (low, high, high)]
    deltas = await run_group(peers, routers, tensors, part_size_bytes=4096)
    results = [local + delta for (local,), (delta,) in zip(tensors, deltas)]
    assert all(torch.equal(result, results[0]) for result in results)
    exact_mean = (low + 2 * high) // 3  # (a float64 mean is within 2**10 of it at this size)
    assert int((results[0] - exact_mean).abs().max()) <= 2**10


@pytest.mark.parametrize("far", [0, -(2**62), 2**63 - 1], ids=["zero", "far-negative", "int64-max"])
@pytest.mark.parametrize("order", [(0, 1, 2), (1, 0, 2), (1, 2, 0)], ids=["zero-weight-first", "second", "last"])
async def test_a_zero_weight_contribution_leaves_an_int64_average_exact(far, order):
    """A sender of weight 0 contributes nothing, however far its values are: when its part came first, it became the
    base of the exact int64 offsets and the others' offsets from it (beyond 2**53) lost their last bits in float64
    (``(2**62 at weight 0, 5)`` averaged to 0); far enough, it made the sum fall back to float64 values."""
    values = {0: torch.full((4,), far, dtype=torch.int64), 1: torch.full((4,), BIG), 2: torch.full((4,), BIG + 2)}
    weights = {0: 0.0, 1: 1.0, 2: 1.0}
    reducer = TensorPartReducer([(4,)], 3, part_dtypes=[torch.int64])
    futures = [await reducer.submit_part(sender, 0, values[sender], weights[sender]) for sender in order]
    for future in futures:
        assert torch.equal(await future, torch.full((4,), BIG + 1))


@pytest.mark.timeout(60)
async def test_a_zero_weight_peer_with_far_int64_values_leaves_the_others_average_exact(p2p_factory):
    peers = await make_connected_peers(p2p_factory, 3)
    routers = await start_routers(peers)
    tensors = [[torch.full((3000,), value, dtype=torch.int64)] for value in (0, BIG, BIG + 2)]
    weights = [dict(weight=0.0), dict(weight=1.0), dict(weight=1.0)]
    deltas = await run_group(peers, routers, tensors, part_size_bytes=4096, per_peer_kwargs=weights)
    for (local,), (delta,) in zip(tensors, deltas):
        assert torch.equal(local + delta, torch.full((3000,), BIG + 1, dtype=torch.int64))
