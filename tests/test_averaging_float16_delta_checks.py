"""The all-reduce's checks of received float16 deltas cost about as much as those of float32 ones.

Each delta is checked for inf/NaN and for overflowing the local values once added (two scans of the largest
magnitude). NumPy's float16 reductions run without vector instructions, about 100x slower than torch's: a float16
model's every round spent seconds per 100M elements in these checks alone.
"""

import math
import time

import pytest
import torch

from hivemind.averaging.part_encoding import refuse_non_finite
from hivemind.averaging.part_math import largest_magnitude


def _best_time(function, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - started)
    return best


@pytest.mark.timeout(60)
def test_float16_delta_check_costs_about_as_much_as_float32():
    size = 2**22
    local32, delta32 = torch.randn(size), torch.randn(size) * 1e-3
    local16, delta16 = local32.half(), delta32.half()
    time32 = _best_time(lambda: refuse_non_finite(delta32, local32, "delta"))
    time16 = _best_time(lambda: refuse_non_finite(delta16, local16, "delta"))
    # at most a few times float32's (it moves half the bytes); NumPy's float16 scans took ~25x as long
    assert time16 < 5 * time32 + 0.02, (time16, time32)


def test_float16_largest_magnitude_sees_nan_inf_and_empty():
    assert largest_magnitude(torch.tensor([1.0, -3.0, 2.0]).half()) == 3.0
    assert largest_magnitude(torch.tensor([1.0, float("-inf")]).half()) == float("inf")
    assert math.isnan(largest_magnitude(torch.tensor([float("nan"), 1.0]).half()))
    assert largest_magnitude(torch.empty(0, dtype=torch.float16)) == 0.0
