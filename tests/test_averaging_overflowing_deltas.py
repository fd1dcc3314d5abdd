"""A reducer's finite deltas that would overflow the local values to inf once added (float16 65504 onto 16..63) are
refused like non-finite ones: those parts keep their local values, and the local tensors stay finite."""

import pytest
import torch
from allreduce_helpers import make_connected_peers, run_group, start_routers
from averaging_hostile_peer import delta_message, hostile_setup, run_step


@pytest.mark.timeout(60)
@pytest.mark.parametrize("dtype, huge", [(torch.float16, 65504.0), (torch.float32, 3.0e38)])
async def test_finite_deltas_that_overflow_the_local_values_are_refused(dtype, huge):
    tensor = torch.arange(64).to(dtype) * (1.0 if dtype == torch.float16 else 5e36)  # finite, up to 3.15e38
    original = tensor.clone()
    part_numel = 64 // tensor.element_size()  # part_size_bytes=64
    async with hostile_setup([tensor], part_size_bytes=64) as (hostile, victim):
        hostile.make_delta = lambda message: delta_message(torch.full((part_numel,), huge, dtype=dtype))
        outcome = await run_step(hostile, victim, timeout=20)
        assert hostile.parts_received, f"the victim never reached the hostile reducer: {outcome!r}"
        with victim.get_tensors() as (averaged,):
            assert torch.isfinite(averaged).all(), "a reducer's deltas overflowed the local tensors to inf"
            assert torch.equal(averaged, original)


@pytest.mark.timeout(60)
async def test_a_float16_step_beyond_float16_range_still_reaches_the_mean(p2p_factory):
    # the mean is representable, but a member's step towards it is not in float16: -65504 + 98256 (weights 1 and 3);
    # the deltas of float16 parts are float32 (as hivemind 1.1.12 sends them), so that member reaches the mean too
    peers = await make_connected_peers(p2p_factory, 2)
    routers = await start_routers(peers)
    tensors = [[torch.full((64,), value, dtype=torch.float16)] for value in (-65504.0, 65504.0)]
    weights = (1.0, 3.0)
    deltas = await run_group(
        peers, routers, tensors, part_size_bytes=32, per_peer_kwargs=[dict(weight=weight) for weight in weights]
    )
    for (local,), (delta,) in zip(tensors, deltas):
        assert delta.dtype == torch.float32 and torch.isfinite(delta).all()
        assert torch.equal(local.add(delta), torch.full((64,), 32752.0, dtype=torch.float16))
