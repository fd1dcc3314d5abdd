"""A float32 delta for a float16/bfloat16 part is added in float32 and then rounded to the part's dtype: two
roundings. A delta just below the largest step that can never carry a 16-bit value past its maximum (16 for float16)
is rounded up in float32 to exactly that step, and the second rounding then makes the local maximum inf; such deltas
must be refused like any other that overflows the local values."""

import math

import pytest
import torch
from averaging_hostile_peer import delta_message, hostile_setup, run_step


def _just_below_the_overflow_step(dtype: torch.dtype) -> float:
    info = torch.finfo(dtype)
    step = math.ldexp(info.eps, math.frexp(info.max)[1] - 2)  # half the spacing of the dtype's values at its maximum
    return float(torch.tensor(step, dtype=torch.float32).nextafter(torch.tensor(0.0)))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
async def test_a_float32_delta_that_rounds_a_16_bit_maximum_to_inf_is_refused(dtype):
    local = torch.full((64,), torch.finfo(dtype).max, dtype=dtype)
    delta = torch.full((64,), _just_below_the_overflow_step(dtype), dtype=torch.float32)
    assert not torch.isfinite(local.clone().add_(delta)).all(), "the delta does not reach inf: the test checks nothing"
    async with hostile_setup([local.clone()]) as (hostile, victim):
        hostile.make_delta = lambda message: delta_message(delta)
        await run_step(hostile, victim, timeout=20)
        assert hostile.parts_received, "the victim never reached the hostile reducer"
        with victim.get_tensors() as (averaged,):
            assert torch.isfinite(averaged).all(), "a float32 delta made the local 16-bit values inf"
            assert torch.equal(averaged, local)


@pytest.mark.timeout(30)
async def test_a_delta_of_another_dtype_is_refused_naming_both_accepted_dtypes():
    from hivemind.averaging.part_encoding import decode_part
    from hivemind.averaging.partition import AllreduceException

    message = delta_message(torch.zeros(64, dtype=torch.float64))
    with pytest.raises(AllreduceException, match=r"expected 64 elements of float16 or float32"):
        await decode_part(message, 64, torch.float16, what="delta 0")
    assert (await decode_part(delta_message(torch.ones(64)), 64, torch.float16, what="delta 0")).dtype == torch.float32
