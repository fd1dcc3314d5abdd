"""Pure-torch block-wise 8-bit quantization that produces the same bytes as bitsandbytes' CPU kernel.

Format (bitsandbytes' "dynamic" 8-bit blockwise quantization): the flattened tensor is cut into blocks of 4096
elements; each block stores its absolute maximum (float32) and one uint8 index per element into a shared 256-entry
code book of signed dynamic-exponent values in [-1, 1]. Decoding is ``code[index] * absmax[block]``.

Index rule (as bitsandbytes >= 0.45 on CPU): the normalized value ``v = clamp(x * (1 / absmax), -1, 1)`` is mapped
to a grid position ``trunc(((v + 1) * 0.5) * 65535 + 0.5)`` in float32; each of the 65536 grid points maps to the
code entry nearest to it (the number of code midpoints strictly below the grid value). Blocks whose absmax is 0 get
index 0 everywhere.
"""

from __future__ import annotations

import functools
from typing import Tuple

import torch

__all__ = ["BLOCK_SIZE", "dynamic_code", "quantize_blockwise", "dequantize_blockwise"]

BLOCK_SIZE = 4096
_GRID_SIZE = 65536
_CHUNK_BLOCKS = 512  # blocks processed per step (8 MiB of float32), so the elementwise passes stay in cache


@functools.cache
def dynamic_code() -> torch.Tensor:
    """The 256-entry signed dynamic code book (7 exponent levels), sorted ascending, float32.

    Level i (i = 0..6) contributes 2**i linearly spaced fractions in (0.1, 1) scaled by 10**(i - 6), with both
    signs; together with 0 and 1 that makes 2 * 127 + 2 = 256 values.
    """
    values = []
    for level in range(7):
        edges = torch.linspace(0.1, 1, 2**level + 1, dtype=torch.float32)
        fractions = (edges[:-1] + edges[1:]) / 2.0
        scale = 10.0 ** (level - 6)
        values.append(scale * fractions)
        values.append(-scale * fractions)
    values.append(torch.tensor([0.0, 1.0], dtype=torch.float32))
    return torch.sort(torch.cat(values)).values


@functools.cache
def _grid_to_code_index() -> torch.Tensor:
    code = dynamic_code()
    midpoints = (code[:-1] + code[1:]) * 0.5
    grid = (torch.arange(_GRID_SIZE, dtype=torch.float32) * 2.0) / float(_GRID_SIZE - 1) - 1.0
    return torch.searchsorted(midpoints, grid, right=False).to(torch.uint8)


def quantize_blockwise(flat: torch.Tensor, indices_out: torch.Tensor = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Quantize a 1-d float32 tensor: returns (uint8 indices of the same length, float32 absmax per block).

    ``indices_out``, if given, is a uint8 tensor of the same length that receives the indices.
    """
    assert flat.ndim == 1 and flat.dtype == torch.float32, "expected a flat float32 tensor"
    numel = flat.numel()
    num_blocks = -(-numel // BLOCK_SIZE)
    indices = torch.empty(numel, dtype=torch.uint8, device=flat.device) if indices_out is None else indices_out
    absmax = torch.empty(num_blocks, dtype=torch.float32, device=flat.device)
    lookup = _grid_to_code_index().to(flat.device)

    chunk_elements = _CHUNK_BLOCKS * BLOCK_SIZE
    work = torch.empty(min(numel, chunk_elements), dtype=torch.float32, device=flat.device)
    grid_index = torch.empty(min(numel, chunk_elements), dtype=torch.int32, device=flat.device)
    for start in range(0, numel, chunk_elements):
        chunk = flat[start : start + chunk_elements]
        length = chunk.numel()
        first_block, chunk_blocks = start // BLOCK_SIZE, -(-length // BLOCK_SIZE)
        chunk_absmax = absmax[first_block : first_block + chunk_blocks]
        _block_absmax(chunk, out=chunk_absmax)

        values = work[:length]
        full = (length // BLOCK_SIZE) * BLOCK_SIZE
        inverse = torch.reciprocal(chunk_absmax)
        torch.mul(
            chunk[:full].view(-1, BLOCK_SIZE),
            inverse[: full // BLOCK_SIZE, None],
            out=values[:full].view(-1, BLOCK_SIZE),
        )
        if full < length:
            torch.mul(chunk[full:], inverse[-1], out=values[full:])
        values.clamp_(-1.0, 1.0).add_(1.0).mul_(0.5).mul_(float(_GRID_SIZE - 1)).add_(0.5)
        positions = grid_index[:length]
        positions.copy_(values)  # float -> int truncation; NaN inputs give garbage positions, clamped below
        positions.clamp_(0, _GRID_SIZE - 1)
        torch.index_select(lookup, 0, positions, out=indices[start : start + length])

    _zero_where_absmax_is_zero(indices, absmax)
    return indices, absmax


def _zero_where_absmax_is_zero(indices: torch.Tensor, absmax: torch.Tensor) -> None:
    """Blocks with absmax 0 (all zeros) get index 0 for every element, as bitsandbytes writes them."""
    zero = absmax == 0
    if not zero.any():
        return
    full_blocks = indices.numel() // BLOCK_SIZE
    indices[: full_blocks * BLOCK_SIZE].view(full_blocks, BLOCK_SIZE)[zero[:full_blocks]] = 0
    if full_blocks < zero.numel() and zero[-1]:
        indices[full_blocks * BLOCK_SIZE :] = 0


def _block_absmax(chunk: torch.Tensor, out: torch.Tensor) -> None:
    """out[b] = max |chunk[b * 4096 : (b + 1) * 4096]|, with NaN ignored (as bitsandbytes does)."""
    full = (chunk.numel() // BLOCK_SIZE) * BLOCK_SIZE
    if full:
        torch.amax(chunk[:full].view(-1, BLOCK_SIZE).abs(), dim=1, out=out[: full // BLOCK_SIZE])
    if full < chunk.numel():
        out[-1] = chunk[full:].abs().max()
    if torch.isnan(out).any():
        for block in torch.isnan(out).nonzero().view(-1).tolist():
            piece = chunk[block * BLOCK_SIZE : (block + 1) * BLOCK_SIZE]
            out[block] = torch.nan_to_num(piece.abs(), nan=0.0).max()


def dequantize_blockwise(
    indices: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, out: torch.Tensor = None
) -> torch.Tensor:
    """``code[indices] * absmax[block]`` as a flat float32 tensor (indices: uint8, 1-d; absmax, code: float32)."""
    numel = indices.numel()
    if out is None:
        out = torch.empty(numel, dtype=torch.float32, device=indices.device)
    chunk_elements = _CHUNK_BLOCKS * BLOCK_SIZE
    for start in range(0, numel, chunk_elements):
        piece = indices[start : start + chunk_elements]
        length = piece.numel()
        target = out[start : start + length]
        torch.index_select(code, 0, piece.to(torch.int32), out=target)
        first_block = start // BLOCK_SIZE
        full = (length // BLOCK_SIZE) * BLOCK_SIZE
        if full:
            target[:full].view(-1, BLOCK_SIZE).mul_(absmax[first_block : first_block + full // BLOCK_SIZE, None])
        if full < length:
            target[full:].mul_(absmax[first_block + full // BLOCK_SIZE])
    return out
