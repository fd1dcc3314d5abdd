"""float16 and bfloat16 averaged tensors end at their exactly rounded average (as with hivemind 1.1.12): the deltas of
their parts are float32, so that ``local + delta`` is rounded once, and a float32 delta (what 1.1.12 peers send for
such parts) is accepted; a 16-bit delta rounded from the float32 average was off by up to its own rounding step
(local 100, average 0.01: the delta -99.99 rounds to -100), up to 33% of the average in bfloat16."""

import pytest
import torch
from averager_helpers import averagers_on, dht_swarm
from averaging_hostile_peer import delta_message, hostile_setup, run_step

from hivemind.compression import Float16Compression, ScaledFloat16Compression

PAIR = dict(target_group_size=2, min_group_size=2, min_matchmaking_time=2.0, request_timeout=1.0)


def _values_of_many_scales(seed: int, dtype: torch.dtype) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    scales = 10.0 ** torch.randint(-3, 3, (1000,), generator=generator)
    return (torch.randn(1000, generator=generator) * scales).to(dtype)


def _average_in_pairs(tensors, prefix: str, **options) -> list:
    """One step of two averagers (on two DHTs joined through a third) holding ``tensors[0]`` and ``tensors[1]``;
    returns each one's tensors after it"""
    with dht_swarm(3) as dhts, averagers_on(dhts[1:], tensors, prefix=prefix, **PAIR, **options) as averagers:
        controls = [averager.step(wait=False, timeout=30) for averager in averagers]
        for control in controls:
            assert len(control.result(timeout=60)) == 2
        results = []
        for averager in averagers:
            with averager.get_tensors() as averaged:
                results.append([tensor.clone() for tensor in averaged])
        return results


@pytest.mark.timeout(90)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_tensors_average_to_the_rounded_average(dtype):
    tensors = [[_values_of_many_scales(seed, dtype)] for seed in range(2)]
    expected = ((tensors[0][0].double() + tensors[1][0].double()) / 2).to(dtype)
    for (averaged,) in _average_in_pairs(tensors, prefix="half", part_size_bytes=512):
        assert averaged.dtype == dtype
        mismatched = int((averaged != expected).sum())
        assert mismatched == 0, f"{mismatched} of 1000 values are not the rounded average"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
async def test_a_float32_delta_for_a_half_precision_part_is_applied(dtype):
    # what a hivemind 1.1.12 reducer sends for a float16/bfloat16 part: average - local, in float32
    local = torch.full((64,), 100.0, dtype=dtype)
    average = torch.full((64,), 0.0123, dtype=torch.float32)
    async with hostile_setup([local.clone()]) as (hostile, victim):
        hostile.make_delta = lambda message: delta_message(average - local.float())
        outcome = await run_step(hostile, victim, timeout=20)
        assert not isinstance(outcome, BaseException), outcome
        with victim.get_tensors() as (averaged,):
            assert averaged.dtype == dtype
            assert torch.equal(averaged, average.to(dtype)), "the float32 delta was not applied"


@pytest.mark.timeout(60)
async def test_a_float32_delta_that_overflows_a_float16_part_is_refused():
    local = torch.full((64,), 60000.0, dtype=torch.float16)
    async with hostile_setup([local.clone()]) as (hostile, victim):
        hostile.make_delta = lambda message: delta_message(torch.full((64,), 1e6, dtype=torch.float32))
        await run_step(hostile, victim, timeout=20)
        assert hostile.parts_received, "the victim never reached the hostile reducer"
        with victim.get_tensors() as (averaged,):
            assert torch.equal(averaged, local), "a delta beyond float16's range made the local values inf"


@pytest.mark.timeout(90)
@pytest.mark.parametrize("codec", [Float16Compression, ScaledFloat16Compression])
def test_bfloat16_tensors_travel_uncompressed_under_a_16_bit_codec(codec):
    # Float16Compression and ScaledFloat16Compression refuse bfloat16 (already 16 bits): such tensors used to fail
    # the step of the peer that sent them (and stay unaveraged at the other), now they are averaged exactly
    tensors = [
        [_values_of_many_scales(seed, torch.float32), _values_of_many_scales(seed, torch.bfloat16)] for seed in (0, 1)
    ]
    expected = ((tensors[0][1].double() + tensors[1][1].double()) / 2).to(torch.bfloat16)
    for _, averaged in _average_in_pairs(tensors, prefix="bf16codec", compression=codec()):
        assert torch.equal(averaged, expected)
