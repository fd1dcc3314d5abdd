"""A reducer keeps the sums of float16/bfloat16 parts in float32. The first two contributions of a part were added
(or the first one scaled by its weight) by torch in their own dtype, which rounds to 8 significant bits in bfloat16
before the float32 sum receives the result: with three or more members, or with weights, bfloat16 tensors ended off
their rounded average (with two members of weight 1 the error vanished in the final rounding, but it showed again
with averaging_alpha != 1). The values here are multiples of 2**-6 below 64, so their float32 sums and averages are
exact and the expected results are the true averages rounded once."""

import pytest
import torch
from allreduce_helpers import make_connected_peers, run_group, start_routers

pytestmark = pytest.mark.timeout(60)


def _values(seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randint(-(2**12), 2**12, (1000,), generator=generator) * 2.0**-6).to(torch.bfloat16)


async def _check_weighted_average(p2p_factory, weights):
    peers = await make_connected_peers(p2p_factory, len(weights))
    routers = await start_routers(peers)
    tensors = [[_values(seed)] for seed in range(len(weights))]
    weighted_sum = sum(weight * own[0].double() for weight, own in zip(weights, tensors))
    expected = (weighted_sum / sum(weights)).to(torch.bfloat16)
    deltas = await run_group(
        peers, routers, tensors, part_size_bytes=64, per_peer_kwargs=[dict(weight=weight) for weight in weights]
    )
    for (local,), (delta,) in zip(tensors, deltas):
        result = local.clone().add_(delta)  # as the averager applies a delta
        mismatched = int((result != expected).sum())
        assert mismatched == 0, f"{mismatched} of 1000 bfloat16 values are not the rounded average"


async def test_bfloat16_tensors_of_four_members_end_at_the_rounded_average(p2p_factory):
    await _check_weighted_average(p2p_factory, [1.0, 1.0, 1.0, 1.0])


async def test_weighted_bfloat16_tensors_end_at_the_rounded_average(p2p_factory):
    await _check_weighted_average(p2p_factory, [3.0, 1.0])
