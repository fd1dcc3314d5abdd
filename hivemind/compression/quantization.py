"""8-bit codecs: uniform bins (UNIFORM_8BIT), approximate quantile bins (QUANTILE_8BIT), block-wise (BLOCKWISE_8BIT).

All of them are vectorized torch code that works over cache-sized chunks of the tensor.
"""

from __future__ import annotations

import math
import struct
from abc import abstractmethod
from typing import Callable, Dict, Optional, Tuple

import numpy as np
import torch

from hivemind.compression import blockwise_kernel
from hivemind.compression.base import CompressionInfo, FloatingOnlyCodec, with_requires_grad
from hivemind.compression.buffers import (
    CHUNK_ELEMENTS,
    MessageBuffer,
    TensorDecodeError,
    empty_output,
    expect_length,
    floating_output_dtype,
    name_to_dtype,
    read_array,
    validated_shape,
)
from hivemind.proto import runtime_pb2
from hivemind.utils.logging import get_logger

__all__ = ["Quantization", "Uniform8BitQuantization", "Quantile8BitQuantization", "BlockwiseQuantization"]

logger = get_logger(__name__)

NUM_BINS = 256
_SAMPLE_SIZE = 2**20  # larger tensors get their statistics (spread, quantiles, bin averages) from a sample
_SAMPLE_BLOCK = 2**12  # the sample is made of contiguous blocks of this many elements (cache friendly)
_SMALL_SAMPLE_SIZE = 2**16  # elements used for the spread (uniform) and the quantile boundaries (quantile)
_QUANTILE_GRID_SIZE = 2**16  # resolution of the lookup table that assigns values to quantile bins
_HEADER = struct.Struct("<q")


def _sample(flat: torch.Tensor) -> torch.Tensor:
    """The whole tensor as float32 if it has at most _SAMPLE_SIZE elements, else _SAMPLE_SIZE elements taken as
    contiguous blocks at random positions (deterministic: the generator is seeded with the tensor size)."""
    numel = flat.numel()
    if numel <= _SAMPLE_SIZE:
        return flat.float()
    generator = torch.Generator().manual_seed(numel)
    starts = torch.randint(0, numel - _SAMPLE_BLOCK + 1, (_SAMPLE_SIZE // _SAMPLE_BLOCK, 1), generator=generator)
    positions = (starts + torch.arange(_SAMPLE_BLOCK)).view(-1).to(flat.device)
    return flat[positions].float()


def _affine_to_float32(
    chunk: torch.Tensor, shift: float, scale: float, offset: float, out: torch.Tensor, max_folded: float
) -> None:
    """out = (chunk - shift) * scale + offset in float32, in one pass when folding the shift into the offset
    (x * scale + (offset - shift * scale)) loses at most ~max_folded * 2**-24 units of the result."""
    if chunk.dtype in (torch.float16, torch.bfloat16):
        # the arithmetic must not run in 16 bits: a large scale overflows there (or is refused as an alpha)
        out.copy_(chunk)
        chunk = out
    if abs(shift * scale) < max_folded:
        torch.add(torch.tensor(offset - shift * scale, dtype=torch.float32), chunk, alpha=scale, out=out)
    else:
        torch.sub(chunk, shift, out=out).mul_(scale).add_(offset)


class Quantization(FloatingOnlyCodec):
    """Shared wire format of UNIFORM_8BIT and QUANTILE_8BIT: int64 n ‖ n float32 code book ‖ numel uint8 indices."""

    n_bits = bits_per_element = 8

    @abstractmethod
    def quantize(self, flat: torch.Tensor, indices_out: torch.Tensor) -> torch.Tensor:
        """Write one bin index per element of ``flat`` into ``indices_out``; return the float32 code book."""

    def compress_floating(
        self, tensor: torch.Tensor, info: CompressionInfo, allow_inplace: bool = False
    ) -> runtime_pb2.Tensor:
        requires_grad, tensor = tensor.requires_grad, tensor.detach()
        flat = tensor.reshape(-1)
        numel = flat.numel()
        codebook_bytes = NUM_BINS * 4
        message_buffer = MessageBuffer(_HEADER.size + codebook_bytes + numel, flat.device)
        packed = message_buffer.tensor
        indices = packed[_HEADER.size + codebook_bytes :]
        if numel > 0:
            codebook = self.quantize(flat, indices)
        else:
            codebook = torch.zeros(NUM_BINS, dtype=torch.float32, device=flat.device)
        packed[: _HEADER.size].view(torch.int64).fill_(NUM_BINS)
        packed[_HEADER.size : _HEADER.size + codebook_bytes].view(torch.float32).copy_(codebook)
        return self._message(tensor, message_buffer.to_bytes(), requires_grad)

    def extract(self, serialized_tensor: runtime_pb2.Tensor) -> torch.Tensor:
        shape, numel = validated_shape(serialized_tensor)
        dtype = floating_output_dtype(serialized_tensor)
        buffer = serialized_tensor.buffer
        if len(buffer) < _HEADER.size:
            raise TensorDecodeError(f"8-bit quantized tensor: buffer of {len(buffer)} bytes has no code book header")
        (num_codes,) = _HEADER.unpack_from(buffer, 0)
        if not (0 < num_codes <= NUM_BINS or (numel == 0 and num_codes == 0)):
            raise TensorDecodeError(f"8-bit quantized tensor: code book size must be in [1, 256], got {num_codes}")
        expect_length(buffer, _HEADER.size + 4 * num_codes + numel, f"8-bit quantized tensor of shape {list(shape)}")
        codebook = read_array(buffer, _HEADER.size, num_codes, torch.float32).to(dtype)
        indices = read_array(buffer, _HEADER.size + 4 * num_codes, numel, torch.uint8)
        if num_codes < NUM_BINS and numel > 0 and int(indices.max()) >= num_codes:
            raise TensorDecodeError(
                f"8-bit quantized tensor: index {int(indices.max())} >= code book size {num_codes}"
            )
        return with_requires_grad(serialized_tensor, _lookup(codebook, indices).reshape(shape))


def _lookup(codebook: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """codebook[indices] for uint8 indices, chunk by chunk (avoids materializing int64 indices)."""
    result = empty_output(indices.numel(), codebook.dtype, codebook.device)
    for start in range(0, indices.numel(), CHUNK_ELEMENTS):
        piece = indices[start : start + CHUNK_ELEMENTS]
        torch.index_select(codebook, 0, piece.to(torch.int32), out=result[start : start + piece.numel()])
    return result


def _bin_averages(sample: torch.Tensor, sample_indices: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """Code book: the mean of the sample elements in each bin; ``fallback`` values for bins the sample misses."""
    counts = torch.bincount(sample_indices, minlength=NUM_BINS)
    sums = torch.bincount(sample_indices, weights=sample, minlength=NUM_BINS).double()
    averages = sums / counts.clamp_min(1)
    return torch.where(counts > 0, averages, fallback.to(averages)).float()


class Uniform8BitQuantization(Quantization):
    """256 equal-width bins covering mean ± 3 std (outliers go to the edge bins); code book = bin averages.

    For tensors of more than 2**20 elements, the std and the bin averages are estimated from a 2**20-element sample.
    """

    compression_type = runtime_pb2.CompressionType.UNIFORM_8BIT
    RANGE_IN_SIGMAS = 6.0

    def quantize(self, flat: torch.Tensor, indices_out: torch.Tensor) -> torch.Tensor:
        numel = flat.numel()
        mean = float(flat.sum(dtype=torch.float64 if flat.dtype == torch.float64 else torch.float32)) / numel
        sample = _sample(flat)
        spread_sample = sample[:: max(1, sample.numel() // _SMALL_SAMPLE_SIZE)] - mean  # 2**16 elements suffice
        std = math.sqrt(float(torch.dot(spread_sample, spread_sample)) / spread_sample.numel())
        bins_per_unit = NUM_BINS / (self.RANGE_IN_SIGMAS * std) if std > 0 and math.isfinite(std) else 1.0
        if not math.isfinite(mean) or not math.isfinite(bins_per_unit):
            mean, bins_per_unit = 0.0, 1.0

        def assign_bins(values: torch.Tensor, indices: torch.Tensor, work: torch.Tensor) -> None:
            # bin = round((x - mean) / bin_width) + 128, clipped to [0, 255]; the float -> uint8 copy truncates
            for start in range(0, values.numel(), CHUNK_ELEMENTS):
                chunk = values[start : start + CHUNK_ELEMENTS]
                chunk_work = work[: chunk.numel()]
                _affine_to_float32(chunk, mean, bins_per_unit, NUM_BINS // 2 + 0.5, chunk_work, max_folded=2**12)
                indices[start : start + chunk.numel()].copy_(chunk_work.clamp_(0, NUM_BINS - 1))

        work = torch.empty(min(numel, CHUNK_ELEMENTS), dtype=torch.float32, device=flat.device)
        assign_bins(flat, indices_out, work)
        if sample.numel() == numel:
            sample_indices = indices_out
        else:
            sample_indices = torch.empty(sample.numel(), dtype=torch.uint8, device=flat.device)
            assign_bins(sample, sample_indices, work)
        bin_centers = mean + (torch.arange(NUM_BINS, dtype=torch.float64) - NUM_BINS // 2) / bins_per_unit
        return _bin_averages(sample, sample_indices, bin_centers.to(flat.device))


class Quantile8BitQuantization(Quantization):
    """256 bins holding about the same number of elements (boundaries = approximate quantiles, from a random
    sample of at most 2**16 elements); code book = bin averages (estimated from a 2**20-element sample for
    larger tensors)."""

    compression_type = runtime_pb2.CompressionType.QUANTILE_8BIT

    def quantize(self, flat: torch.Tensor, indices_out: torch.Tensor) -> torch.Tensor:
        numel = flat.numel()
        all_finite = math.isfinite(float(flat.sum(dtype=torch.float64 if flat.dtype == torch.float64 else None)))
        sample = _sample(flat)
        quantile_sample = sample[:: max(1, sample.numel() // _SMALL_SAMPLE_SIZE)]
        if quantile_sample.device.type == "cpu":  # numpy's vectorized sort is several times faster here
            sorted_sample = torch.from_numpy(np.sort(quantile_sample.numpy()))
        else:
            sorted_sample = torch.sort(quantile_sample).values
        positions = (torch.arange(1, NUM_BINS, device=flat.device) * sorted_sample.numel()) // NUM_BINS
        boundaries = sorted_sample[positions]  # 255 non-decreasing edges; bin k holds boundaries[k-1] <= x < ...
        low, high = float(boundaries[0]), float(boundaries[-1])

        if math.isfinite(low) and math.isfinite(high) and high > low and numel <= _SMALL_SAMPLE_SIZE:
            # small tensors: an exact search (a value equal to a boundary belongs to the bin it starts); with at
            # most 256 elements every value is a boundary, so each distinct value gets its own bin, as the original

            def assign_bins(values: torch.Tensor, indices: torch.Tensor) -> None:
                found = torch.searchsorted(boundaries, values.float(), right=True)
                indices.copy_(found.clamp_(0, NUM_BINS - 1))

        elif math.isfinite(low) and math.isfinite(high) and high > low:
            # a fine uniform grid over [low, high] with a precomputed bin per cell replaces a binary search
            cells_per_unit = _QUANTILE_GRID_SIZE / (high - low)
            cell_centers = low + (torch.arange(_QUANTILE_GRID_SIZE, dtype=torch.float64) + 0.5) / cells_per_unit
            cell_to_bin = torch.empty(_QUANTILE_GRID_SIZE + 2, dtype=torch.uint8, device=flat.device)
            cell_to_bin[0], cell_to_bin[-1] = 0, NUM_BINS - 1  # below low / at or above high
            cell_to_bin[1:-1] = torch.searchsorted(boundaries.double(), cell_centers.to(flat.device), right=True)
            work = torch.empty(min(numel, CHUNK_ELEMENTS), dtype=torch.float32, device=flat.device)
            cells = torch.empty(min(numel, CHUNK_ELEMENTS), dtype=torch.int32, device=flat.device)

            def assign_bins(values: torch.Tensor, indices: torch.Tensor) -> None:
                for start in range(0, values.numel(), CHUNK_ELEMENTS):
                    chunk = values[start : start + CHUNK_ELEMENTS]
                    chunk_work, chunk_cells = work[: chunk.numel()], cells[: chunk.numel()]
                    _affine_to_float32(chunk, low, cells_per_unit, 1.0, chunk_work, max_folded=2**20)
                    chunk_cells.copy_(chunk_work.clamp_(0, _QUANTILE_GRID_SIZE + 1))
                    if not all_finite:  # NaN became an arbitrary int: keep it in range
                        chunk_cells.clamp_(0, _QUANTILE_GRID_SIZE + 1)
                    torch.index_select(cell_to_bin, 0, chunk_cells, out=indices[start : start + chunk.numel()])

        else:  # (nearly) constant sample: two bins, below the common value and at or above it

            def assign_bins(values: torch.Tensor, indices: torch.Tensor) -> None:
                for start in range(0, values.numel(), CHUNK_ELEMENTS):
                    chunk = values[start : start + CHUNK_ELEMENTS]
                    indices[start : start + chunk.numel()].copy_(chunk >= low).mul_(NUM_BINS - 1)

        assign_bins(flat, indices_out)
        if sample.numel() == numel:
            sample_indices = indices_out
        else:
            sample_indices = torch.empty(sample.numel(), dtype=torch.uint8, device=flat.device)
            assign_bins(sample, sample_indices)
        return _bin_averages(sample, sample_indices, torch.cat([boundaries[:1], boundaries]))


class BlockwiseQuantization(FloatingOnlyCodec):
    """bitsandbytes-style block-wise 8-bit quantization (blocks of 4096, dynamic code book, per-block absmax).

    Compatibility note: the original library requires bitsandbytes here and raises ImportError without it. We use
    bitsandbytes when it is installed and can run on this device; otherwise a pure-torch kernel
    (:mod:`hivemind.compression.blockwise_kernel`) that produces the same bytes, so every peer can send and
    receive BLOCKWISE_8BIT.
    """

    compression_type = runtime_pb2.CompressionType.BLOCKWISE_8BIT
    n_bits = bits_per_element = 8

    def compress_floating(
        self, tensor: torch.Tensor, info: CompressionInfo, allow_inplace: bool = False
    ) -> runtime_pb2.Tensor:
        requires_grad, tensor = tensor.requires_grad, tensor.detach()
        flat = tensor.reshape(-1).to(torch.float32).contiguous()
        numel = flat.numel()
        num_blocks = -(-numel // blockwise_kernel.BLOCK_SIZE)
        header = struct.pack("<qq", num_blocks, NUM_BINS)
        offset_indices = len(header) + 4 * num_blocks + 4 * NUM_BINS
        message_buffer = MessageBuffer(offset_indices + numel, flat.device)
        packed = message_buffer.tensor
        indices = packed[offset_indices:]

        quantized = _bitsandbytes_quantize(flat) if numel > 0 else None
        if quantized is not None:
            bnb_indices, absmax, code = quantized
            indices.copy_(bnb_indices.reshape(-1))
        else:
            code = blockwise_kernel.dynamic_code().to(flat.device)
            absmax = torch.zeros(0, device=flat.device)
            if numel > 0:
                _, absmax = blockwise_kernel.quantize_blockwise(flat, indices_out=indices)

        packed[: len(header)].copy_(torch.frombuffer(bytearray(header), dtype=torch.uint8))
        packed[len(header) : len(header) + 4 * num_blocks].view(torch.float32).copy_(absmax)
        packed[len(header) + 4 * num_blocks : offset_indices].view(torch.float32).copy_(code)
        return self._message(tensor, message_buffer.to_bytes(), requires_grad)

    def extract(self, serialized_tensor: runtime_pb2.Tensor) -> torch.Tensor:
        shape, numel = validated_shape(serialized_tensor)
        dtype = name_to_dtype(serialized_tensor.dtype)
        if dtype.is_complex:
            dtype = floating_output_dtype(serialized_tensor)  # raises TensorDecodeError
        # integer and bool tensors too: we refuse to encode them (the values come back rounded or all True), but
        # hivemind 1.1.12 encodes them (e.g. a BatchNorm's num_batches_tracked in a shared state): decoded as it does
        buffer = serialized_tensor.buffer
        if len(buffer) < 16:
            raise TensorDecodeError(f"BLOCKWISE_8BIT tensor: buffer of {len(buffer)} bytes has no header")
        num_blocks, num_codes = struct.unpack_from("<qq", buffer, 0)
        expected_blocks = -(-numel // blockwise_kernel.BLOCK_SIZE)
        if num_blocks != expected_blocks:
            raise TensorDecodeError(
                f"BLOCKWISE_8BIT tensor of shape {list(shape)} must have {expected_blocks} blocks, got {num_blocks}"
            )
        if not (0 < num_codes <= NUM_BINS or (numel == 0 and num_codes == 0)):
            raise TensorDecodeError(f"BLOCKWISE_8BIT tensor: code book size must be in [1, 256], got {num_codes}")
        offset_indices = 16 + 4 * num_blocks + 4 * num_codes
        expect_length(buffer, offset_indices + numel, f"BLOCKWISE_8BIT tensor of shape {list(shape)}")
        absmax = read_array(buffer, 16, num_blocks, torch.float32)
        code = read_array(buffer, 16 + 4 * num_blocks, num_codes, torch.float32)
        indices = read_array(buffer, offset_indices, numel, torch.uint8)
        if num_codes < NUM_BINS and numel > 0 and int(indices.max()) >= num_codes:
            raise TensorDecodeError(f"BLOCKWISE_8BIT tensor: index {int(indices.max())} >= code book size {num_codes}")
        result = _bitsandbytes_dequantize(indices, absmax, code) if num_codes == NUM_BINS and numel > 0 else None
        if result is None:
            result = blockwise_kernel.dequantize_blockwise(
                indices, absmax, code, out=empty_output(numel, torch.float32)
            )
        result = result if dtype == torch.float32 else result.to(dtype)
        return with_requires_grad(serialized_tensor, result.reshape(shape))


def _bitsandbytes_quantize(flat: torch.Tensor) -> Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(indices, absmax, code) from bitsandbytes, or None if it is not installed or cannot run on this device."""
    return _call_bitsandbytes(flat.device.type, "quantize", flat)


def _bitsandbytes_dequantize(
    indices: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor
) -> Optional[torch.Tensor]:
    """``code[indices] * absmax[block]`` (float32) from bitsandbytes' kernel, or None where it is unavailable."""
    return _call_bitsandbytes(indices.device.type, "dequantize", indices, absmax, code)


def _call_bitsandbytes(device_type: str, operation: str, *args: torch.Tensor):
    if device_type not in _bitsandbytes_by_device:
        _bitsandbytes_by_device[device_type] = _load_bitsandbytes()
    functions = _bitsandbytes_by_device[device_type]
    if functions is None:
        return None
    try:
        return functions[operation](*args)
    except Exception as e:  # e.g. a build without kernels for this device: do not try it again
        reason = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        logger.warning(f"bitsandbytes failed to {operation} on {device_type} ({reason}), using the pure-torch kernel")
        _bitsandbytes_by_device[device_type] = None
        return None


_bitsandbytes_by_device: Dict[str, Optional[Dict[str, Callable]]] = {}


def _load_bitsandbytes() -> Optional[Dict[str, Callable]]:
    try:
        from bitsandbytes.functional import dequantize_blockwise, quantize_blockwise
    except Exception:  # ImportError, or a broken installation raising anything at import time
        return None

    def quantize(flat: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        indices, state = quantize_blockwise(flat, blocksize=blockwise_kernel.BLOCK_SIZE)
        if isinstance(state, tuple):  # bitsandbytes < 0.40 returns (absmax, code)
            absmax, code = state
        else:
            absmax, code = state.absmax, state.code
        return indices, absmax.float(), code.float()

    def dequantize(indices: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
        return dequantize_blockwise(indices, absmax=absmax, code=code, blocksize=blockwise_kernel.BLOCK_SIZE)

    return dict(quantize=quantize, dequantize=dequantize)
