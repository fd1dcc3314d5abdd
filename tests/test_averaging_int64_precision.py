"""int64 tensors with values beyond 2**53 (where float64 has no integer step of 1) average exactly: equal values stay
as they are, and a mean halfway between two integers goes to the even one, on every member."""

import pytest
import torch
from allreduce_helpers import make_connected_peers, run_group, start_routers

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
