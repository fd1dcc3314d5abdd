"""Element-wise arithmetic on all-reduce parts, single-threaded.

A part is a few hundred KiB: too small to gain from torch's intra-op thread pool, and on a busy machine (the p2p
daemons, other peers) that pool's waiting threads cost far more CPU than the work itself (measured: 50 instead of 7 ms
of CPU per MiB averaged, two cores, loaded). These helpers run NumPy's single-threaded loops on views of the tensors
and fall back to torch for dtypes NumPy lacks (bfloat16).
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = [
    "copy_into",
    "zero_",
    "add_into",
    "scale_into",
    "add_scaled_",
    "sub_into",
    "div_",
    "total_sum",
    "largest_magnitude",
    "is_integer_dtype",
    "add_offsets_",
    "rounded_average",
    "accumulator_dtype",
    "delta_dtype",
]

_NUMPY_DTYPES = {
    torch.float16, torch.float32, torch.float64, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8,
}  # fmt: skip


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """Sums of float16/bfloat16 parts are kept in float32, of integer parts in float64."""
    if dtype in (torch.float32, torch.float64) or dtype.is_complex:
        return dtype
    return torch.float32 if dtype.is_floating_point else torch.float64


def delta_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of a part's delta (average - local values): float32 for float16/bfloat16 parts, whose average is
    kept in float32, so that local + delta rounds once, to the average itself (a delta rounded to 16 bits first is
    off by up to its own rounding step, which can be larger than the average: local 100, average 0.01); the part's
    own dtype otherwise."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _arrays(*tensors: torch.Tensor):
    """NumPy views of CPU tensors, or None if any of them has no NumPy dtype (called a few times per part: kept to
    the cheapest tensor attributes)."""
    arrays = []
    for tensor in tensors:
        if tensor.dtype not in _NUMPY_DTYPES or not tensor.is_cpu:
            return None
        arrays.append(tensor.detach().numpy() if tensor.requires_grad else tensor.numpy())
    return arrays


def copy_into(output: torch.Tensor, source: torch.Tensor) -> None:
    arrays = _arrays(output, source)
    if arrays is None:
        output.copy_(source)
    else:
        np.copyto(arrays[0], arrays[1], casting="unsafe")


def zero_(output: torch.Tensor) -> None:
    arrays = _arrays(output)
    if arrays is None:
        output.zero_()
    else:
        arrays[0].fill(0)


def add_into(output: torch.Tensor, first: torch.Tensor, second: torch.Tensor) -> None:
    """``output = first + second``, computed in the output's dtype."""
    arrays = _arrays(output, first, second)
    if arrays is None:  # (torch.add(first, second, out=output) would round to the inputs' dtype first: bfloat16)
        output.copy_(first)
        output.add_(second)
    else:
        np.add(arrays[1], arrays[2], out=arrays[0], dtype=arrays[0].dtype, casting="unsafe")


def scale_into(output: torch.Tensor, source: torch.Tensor, factor: float) -> None:
    """``output = source * factor``, computed in the output's dtype."""
    arrays = _arrays(output, source)
    if arrays is None:  # (not torch.mul(source, factor, out=output), which rounds to the source's dtype first)
        output.copy_(source)
        output.mul_(factor)
    else:
        np.multiply(arrays[1], factor, out=arrays[0], dtype=arrays[0].dtype, casting="unsafe")


def add_scaled_(accumulator: torch.Tensor, source: torch.Tensor, factor: float = 1.0) -> None:
    """``accumulator += source * factor``."""
    arrays = _arrays(accumulator, source)
    if arrays is None:
        accumulator.add_(source, alpha=factor)
    elif factor == 1.0:
        np.add(arrays[0], arrays[1], out=arrays[0], dtype=arrays[0].dtype, casting="unsafe")
    else:
        scaled = np.multiply(arrays[1], factor, dtype=arrays[0].dtype, casting="unsafe")
        np.add(arrays[0], scaled, out=arrays[0])


def sub_into(output: torch.Tensor, first: torch.Tensor, second: torch.Tensor) -> None:
    """``output = first - second``, computed in the wider of the inputs' dtypes and stored in the output's."""
    arrays = _arrays(output, first, second)
    if arrays is None:
        output.copy_(torch.sub(first, second))
    else:
        np.subtract(arrays[1], arrays[2], out=arrays[0], dtype=np.result_type(arrays[1], arrays[2]), casting="unsafe")


def div_(accumulator: torch.Tensor, divisor: float) -> torch.Tensor:
    arrays = _arrays(accumulator)
    if arrays is None:
        return accumulator.div_(divisor)
    np.divide(arrays[0], divisor, out=arrays[0], casting="unsafe")
    return accumulator


def total_sum(values: torch.Tensor) -> complex:
    """The sum of all values (inf or NaN if any value is, or if the sum overflows)."""
    arrays = _arrays(values)
    return complex(values.sum()) if arrays is None else complex(np.sum(arrays[0]))


def largest_magnitude(values: torch.Tensor) -> float:
    """``max(|values|)`` of a real tensor, NaN if any value is NaN (two vectorized passes, no temporary)."""
    # (NumPy's float16 reductions are scalar code, ~100x slower than torch's: float16 goes through torch)
    arrays = _arrays(values) if values.dtype != torch.float16 else None
    if arrays is None:
        if values.numel() == 0:
            return 0.0
        low, high = torch.aminmax(values)
        return max(abs(float(low)), abs(float(high)))
    if arrays[0].size == 0:
        return 0.0
    low, high = float(np.min(arrays[0])), float(np.max(arrays[0]))
    return float("nan") if math.isnan(low) or math.isnan(high) else max(abs(low), abs(high))


def is_integer_dtype(dtype: torch.dtype) -> bool:
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def add_offsets_(
    accumulator: torch.Tensor, part: torch.Tensor, base: torch.Tensor, weight: float, denominator: float
) -> bool:
    """``accumulator += weight * (part - base)`` for an integer ``part``: the difference is taken exactly in int64
    before it meets the float64 ``accumulator``. If a difference does not fit in int64 (values of opposite signs
    beyond 2**62), nothing is added and the accumulator becomes the weighted sum of the values so far instead (their
    total weight being ``denominator``); returns False then."""
    values = part.to(torch.int64)
    difference = values - base
    if bool((((values ^ base) & (values ^ difference)) < 0).any()):  # the subtraction overflowed
        add_scaled_(accumulator, base.to(torch.float64), denominator)
        return False
    if weight == 1.0:
        add_scaled_(accumulator, difference)
    elif weight != 0.0:
        add_scaled_(accumulator, difference, weight)
    return True


def rounded_average(base: torch.Tensor, offsets: torch.Tensor, denominator: float) -> torch.Tensor:
    """``base + offsets / denominator`` rounded half to even, as int64, where ``base`` is an int64 tensor and
    ``offsets`` the float64 sum of weighted differences from it. Exact for int64 values of any size, unlike a mean
    taken in float64 (whose 53-bit mantissa moves values beyond 2**53: two equal values 2**60 + 1 average to 2**60)."""
    mean_offset = div_(offsets, denominator)
    floor = torch.floor(mean_offset)
    fraction = mean_offset - floor
    low = base + floor.to(torch.int64)
    round_up = (fraction > 0.5) | ((fraction == 0.5) & (low % 2 != 0))
    return low + round_up.to(torch.int64)
