"""8-bit codecs: uniform bins (UNIFORM_8BIT), approximate quantile bins (QUANTILE_8BIT), block-wise (BLOCKWISE_8BIT).

All of them are vectorized torch code that works over cache-sized chunks of the tensor.
"""

from __future__ import annotations

import functools
import math
import struct
from abc import abstractmethod
from typing import Optional, Tuple

import torch

from hivemind.compression import blockwise_kernel
from hivemind.compression.base import CompressionBase, CompressionInfo
from hivemind.compression.buffers import (
    CHUNK_ELEMENTS,
    TensorDecodeError,
    dtype_to_name,
    expect_length,
    name_to_dtype,
    read_array,
    tensor_to_bytes,
    validated_shape,
)
from hivemind.proto import runtime_pb2
from hivemind.utils.logging import get_logger

__all__ = ["Quantization", "Uniform8BitQuantization", "Quantile8BitQuantization", "BlockwiseQuantization"]

logger = get_logger(__name__)

NUM_BINS = 256
_SAMPLE_SIZE = 2**16  # elements used to estimate the spread (uniform) or the quantiles (quantile) of a tensor
_QUANTILE_GRID_SIZE = 2**16  # resolution of the lookup table that assigns values to quantile bins
_HEADER = struct.Struct("<q")


def _check_quantizable(codec: CompressionBase, tensor: torch.Tensor) -> None:
    if not tensor.is_floating_point():
        raise ValueError(f"{codec.__class__.__name__} compresses floating-point tensors only, got {tensor.dtype}")


def _floating_output_dtype(serialized_tensor: runtime_pb2.Tensor) -> torch.dtype:
    dtype = name_to_dtype(serialized_tensor.dtype)
    if not dtype.is_floating_point:
        raise TensorDecodeError(f"an 8-bit quantized tensor must have a floating dtype, got {serialized_tensor.dtype}")
    return dtype


def _sample(flat: torch.Tensor) -> torch.Tensor:
    """Up to _SAMPLE_SIZE elements drawn uniformly at random (deterministically: fixed seed), as float32."""
    if flat.numel() <= _SAMPLE_SIZE:
        return flat.float()
    generator = torch.Generator(device=flat.device).manual_seed(flat.numel())
    positions = torch.randint(0, flat.numel(), (_SAMPLE_SIZE,), generator=generator, device=flat.device)
    return flat[positions].float()


def _as_weights(chunk: torch.Tensor) -> torch.Tensor:
    return chunk if chunk.dtype in (torch.float32, torch.float64) else chunk.float()


class Quantization(CompressionBase):
    """Shared wire format of UNIFORM_8BIT and QUANTILE_8BIT: int64 n ‖ n float32 code book ‖ numel uint8 indices."""

    n_bits = 8

    @abstractmethod
    def quantize(self, flat: torch.Tensor, indices_out: torch.Tensor) -> torch.Tensor:
        """Write one bin index per element of ``flat`` into ``indices_out``; return the float32 code book."""

    def compress(self, tensor: torch.Tensor, info: CompressionInfo, allow_inplace: bool = False) -> runtime_pb2.Tensor:
        _check_quantizable(self, tensor)
        requires_grad, tensor = tensor.requires_grad, tensor.detach()
        flat = tensor.reshape(-1)
        numel = flat.numel()
        codebook_bytes = NUM_BINS * 4
        packed = torch.empty(_HEADER.size + codebook_bytes + numel, dtype=torch.uint8, device=flat.device)
        indices = packed[_HEADER.size + codebook_bytes :]
        if numel > 0:
            codebook = self.quantize(flat, indices)
        else:
            codebook = torch.zeros(NUM_BINS, dtype=torch.float32, device=flat.device)
        packed[: _HEADER.size].view(torch.int64).fill_(NUM_BINS)
        packed[_HEADER.size : _HEADER.size + codebook_bytes].view(torch.float32).copy_(codebook)
        return runtime_pb2.Tensor(
            compression=self.compression_type,
            buffer=tensor_to_bytes(packed),
            size=tensor.shape,
            dtype=dtype_to_name(tensor.dtype),
            requires_grad=requires_grad,
        )

    def extract(self, serialized_tensor: runtime_pb2.Tensor) -> torch.Tensor:
        shape, numel = validated_shape(serialized_tensor)
        dtype = _floating_output_dtype(serialized_tensor)
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
        return _lookup(codebook, indices).reshape(shape)

    def estimate_compression_ratio(self, info: CompressionInfo) -> float:
        return self.n_bits / torch.finfo(info.descriptor.dtype or torch.float32).bits


def _lookup(codebook: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """codebook[indices] for uint8 indices, chunk by chunk (avoids materializing int64 indices)."""
    result = torch.empty(indices.numel(), dtype=codebook.dtype, device=codebook.device)
    for start in range(0, indices.numel(), CHUNK_ELEMENTS):
        piece = indices[start : start + CHUNK_ELEMENTS]
        torch.index_select(codebook, 0, piece.to(torch.int32), out=result[start : start + piece.numel()])
    return result


def _bin_averages(
    flat: torch.Tensor, indices: torch.Tensor, sums: torch.Tensor, fallback: torch.Tensor
) -> torch.Tensor:
    """Mean of the elements in each bin (``sums`` holds per-bin sums); ``fallback`` values for empty bins."""
    counts = torch.bincount(indices, minlength=NUM_BINS)
    averages = sums / counts.clamp_min(1)
    return torch.where(counts > 0, averages, fallback.to(averages.dtype)).float()


class Uniform8BitQuantization(Quantization):
    """256 equal-width bins covering mean ± 3 std (outliers go to the edge bins); code book = bin averages."""

    compression_type = runtime_pb2.CompressionType.UNIFORM_8BIT
    RANGE_IN_SIGMAS = 6.0

    def quantize(self, flat: torch.Tensor, indices_out: torch.Tensor) -> torch.Tensor:
        numel = flat.numel()
        mean = float(flat.sum(dtype=torch.float64)) / numel
        sample = _sample(flat).double()
        std = float((sample - mean).square_().mean().sqrt_())
        bins_per_unit = NUM_BINS / (self.RANGE_IN_SIGMAS * std) if std > 0 and math.isfinite(std) else 1.0
        if not math.isfinite(mean) or not math.isfinite(bins_per_unit):
            mean, bins_per_unit = 0.0, 1.0

        sums = torch.zeros(NUM_BINS, dtype=torch.float64, device=flat.device)
        work = torch.empty(min(numel, CHUNK_ELEMENTS), dtype=torch.float32, device=flat.device)
        for start in range(0, numel, CHUNK_ELEMENTS):
            chunk = flat[start : start + CHUNK_ELEMENTS]
            values = work[: chunk.numel()]
            # index = round((x - mean) / bin_width) + 128, clipped to [0, 255]; float -> uint8 copy truncates
            torch.sub(chunk, mean, out=values).mul_(bins_per_unit).add_(NUM_BINS // 2 + 0.5).clamp_(0, NUM_BINS - 1)
            indices = indices_out[start : start + chunk.numel()]
            indices.copy_(values)
            sums += torch.bincount(indices, weights=_as_weights(chunk), minlength=NUM_BINS)

        bin_centers = mean + (torch.arange(NUM_BINS, dtype=torch.float64) - NUM_BINS // 2) / bins_per_unit
        return _bin_averages(flat, indices_out, sums, bin_centers.to(flat.device))


class Quantile8BitQuantization(Quantization):
    """256 bins holding about the same number of elements (boundaries = approximate quantiles from a random
    sample); code book = bin averages."""

    compression_type = runtime_pb2.CompressionType.QUANTILE_8BIT

    def quantize(self, flat: torch.Tensor, indices_out: torch.Tensor) -> torch.Tensor:
        numel = flat.numel()
        sorted_sample = torch.sort(_sample(flat)).values
        positions = (torch.arange(1, NUM_BINS, device=flat.device) * sorted_sample.numel()) // NUM_BINS
        boundaries = sorted_sample[positions]  # 255 non-decreasing bin edges; bin k holds boundaries[k-1] <= x < ...
        low, high = float(boundaries[0]), float(boundaries[-1])

        sums = torch.zeros(NUM_BINS, dtype=torch.float64, device=flat.device)
        work = torch.empty(min(numel, CHUNK_ELEMENTS), dtype=torch.float32, device=flat.device)
        if math.isfinite(low) and math.isfinite(high) and high > low:
            # a fine uniform grid over [low, high] with a precomputed bin for each cell replaces a binary search
            cells_per_unit = _QUANTILE_GRID_SIZE / (high - low)
            cell_centers = low + (torch.arange(_QUANTILE_GRID_SIZE, dtype=torch.float64) + 0.5) / cells_per_unit
            cell_to_bin = torch.empty(_QUANTILE_GRID_SIZE + 2, dtype=torch.uint8, device=flat.device)
            cell_to_bin[0], cell_to_bin[-1] = 0, NUM_BINS - 1  # below low / at or above high
            cell_to_bin[1:-1] = torch.searchsorted(boundaries.double(), cell_centers.to(flat.device), right=True)
            cells = torch.empty(min(numel, CHUNK_ELEMENTS), dtype=torch.int32, device=flat.device)
            for start in range(0, numel, CHUNK_ELEMENTS):
                chunk = flat[start : start + CHUNK_ELEMENTS]
                values, chunk_cells = work[: chunk.numel()], cells[: chunk.numel()]
                torch.sub(chunk, low, out=values).mul_(cells_per_unit).add_(1.0).clamp_(0, _QUANTILE_GRID_SIZE + 1)
                chunk_cells.copy_(values).clamp_(0, _QUANTILE_GRID_SIZE + 1)  # the int clamp catches NaN
                indices = indices_out[start : start + chunk.numel()]
                torch.index_select(cell_to_bin, 0, chunk_cells, out=indices)
                sums += torch.bincount(indices, weights=_as_weights(chunk), minlength=NUM_BINS)
        else:  # (nearly) constant sample: two bins, below the common value and at or above it
            for start in range(0, numel, CHUNK_ELEMENTS):
                chunk = flat[start : start + CHUNK_ELEMENTS]
                indices = indices_out[start : start + chunk.numel()]
                indices.copy_(chunk >= low).mul_(NUM_BINS - 1)
                sums += torch.bincount(indices, weights=_as_weights(chunk), minlength=NUM_BINS)

        fallback = torch.cat([boundaries[:1], boundaries]).double()
        return _bin_averages(flat, indices_out, sums, fallback)


class BlockwiseQuantization(CompressionBase):
    """bitsandbytes-style block-wise 8-bit quantization (blocks of 4096, dynamic code book, per-block absmax).

    Compatibility note: the original library requires bitsandbytes here and raises ImportError without it. We use
    bitsandbytes when it is installed and can run on this device; otherwise a pure-torch kernel
    (:mod:`hivemind.compression.blockwise_kernel`) that produces the same bytes, so every peer can send and
    receive BLOCKWISE_8BIT.
    """

    compression_type = runtime_pb2.CompressionType.BLOCKWISE_8BIT
    n_bits = 8

    def compress(self, tensor: torch.Tensor, info: CompressionInfo, allow_inplace: bool = False) -> runtime_pb2.Tensor:
        _check_quantizable(self, tensor)
        requires_grad, tensor = tensor.requires_grad, tensor.detach()
        flat = tensor.reshape(-1).to(torch.float32).contiguous()
        numel = flat.numel()
        num_blocks = -(-numel // blockwise_kernel.BLOCK_SIZE)
        header = struct.pack("<qq", num_blocks, NUM_BINS)
        offset_indices = len(header) + 4 * num_blocks + 4 * NUM_BINS
        packed = torch.empty(offset_indices + numel, dtype=torch.uint8, device=flat.device)
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
        return runtime_pb2.Tensor(
            compression=self.compression_type,
            buffer=tensor_to_bytes(packed),
            size=tensor.shape,
            dtype=dtype_to_name(tensor.dtype),
            requires_grad=requires_grad,
        )

    def extract(self, serialized_tensor: runtime_pb2.Tensor) -> torch.Tensor:
        shape, numel = validated_shape(serialized_tensor)
        dtype = _floating_output_dtype(serialized_tensor)
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
        result = blockwise_kernel.dequantize_blockwise(indices, absmax, code)
        return (result if dtype == torch.float32 else result.to(dtype)).reshape(shape)

    def estimate_compression_ratio(self, info: CompressionInfo) -> float:
        return self.n_bits / torch.finfo(info.descriptor.dtype or torch.float32).bits


def _bitsandbytes_quantize(flat: torch.Tensor) -> Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(indices, absmax, code) from bitsandbytes, or None if it is not installed or cannot run on this device."""
    quantize = _load_bitsandbytes_quantize(flat.device.type)
    if quantize is None:
        return None
    try:
        return quantize(flat)
    except Exception as e:  # e.g. a build without kernels for this device
        logger.warning(f"bitsandbytes failed to quantize ({type(e).__name__}: {e}), using the pure-torch kernel")
        _load_bitsandbytes_quantize.cache_clear()
        _bitsandbytes_disabled_devices.add(flat.device.type)
        return None


_bitsandbytes_disabled_devices = set()


@functools.cache
def _load_bitsandbytes_quantize(device_type: str):
    if device_type in _bitsandbytes_disabled_devices:
        return None
    try:
        from bitsandbytes.functional import quantize_blockwise
    except Exception:  # ImportError, or a broken installation raising anything at import time
        return None

    def quantize(flat: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        indices, state = quantize_blockwise(flat, blocksize=blockwise_kernel.BLOCK_SIZE)
        if isinstance(state, tuple):  # bitsandbytes < 0.40 returns (absmax, code)
            absmax, code = state
        else:
            absmax, code = state.absmax, state.code
        return indices, absmax.float(), code.float()

    return quantize
