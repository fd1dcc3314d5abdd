"""16-bit codecs: plain float16 (FLOAT16) and per-row mean/std normalized float16 (MEANSTD_16BIT)."""

from __future__ import annotations

import math

import torch

from hivemind.compression.base import CompressionBase, CompressionInfo, FloatingOnlyCodec, with_requires_grad
from hivemind.compression.buffers import (
    MessageBuffer,
    buffer_may_be_aliased,
    empty_output,
    expect_length,
    floating_output_dtype,
    read_array,
    validated_shape,
)
from hivemind.proto import runtime_pb2

__all__ = ["Float16Compression", "ScaledFloat16Compression"]

FP16_MAX = 65504.0
FP32_EPS = torch.finfo(torch.float32).eps


def _check_float_input(codec: CompressionBase, tensor: torch.Tensor) -> None:
    if tensor.dtype == torch.bfloat16:
        raise ValueError(
            f"{codec.__class__.__name__} compresses float16/float32/float64 tensors only, got {tensor.dtype}; "
            f"use NoCompression (or an 8-bit codec for bfloat16)"
        )


class Float16Compression(FloatingOnlyCodec):
    """Cast to float16 after clamping to ±65504; restores the original floating dtype."""

    compression_type = runtime_pb2.CompressionType.FLOAT16
    bits_per_element = 16

    def compress_floating(
        self, tensor: torch.Tensor, info: CompressionInfo, allow_inplace: bool = False
    ) -> runtime_pb2.Tensor:
        _check_float_input(self, tensor)
        requires_grad, tensor = tensor.requires_grad, tensor.detach()
        # converting first and clamping the float16 copy gives the same values as clamping first: everything
        # beyond ±65520 becomes ±inf and is clamped back to ±65504, NaN stays NaN
        message_buffer = MessageBuffer(2 * tensor.numel(), tensor.device)
        half = message_buffer.tensor.view(torch.float16).view(tensor.shape).copy_(tensor)
        half.clamp_(-FP16_MAX, FP16_MAX)
        return self._message(tensor, message_buffer.to_bytes(), requires_grad)

    def extract(self, serialized_tensor: runtime_pb2.Tensor) -> torch.Tensor:
        shape, numel = validated_shape(serialized_tensor)
        dtype = floating_output_dtype(serialized_tensor)
        buffer = serialized_tensor.buffer
        expect_length(buffer, 2 * numel, f"FLOAT16 tensor of shape {list(shape)}")
        half = read_array(buffer, 0, numel, torch.float16)
        if dtype != torch.float16:
            result = empty_output(numel, dtype).copy_(half)
        else:
            result = half if buffer_may_be_aliased(buffer) else empty_output(numel, dtype).copy_(half)
        return with_requires_grad(serialized_tensor, result.reshape(shape))


class ScaledFloat16Compression(Float16Compression):
    """Normalize each row (last dimension) to zero mean and unit std, send float16 values and float32 stats."""

    compression_type = runtime_pb2.CompressionType.MEANSTD_16BIT

    def compress_floating(
        self, tensor: torch.Tensor, info: CompressionInfo, allow_inplace: bool = False
    ) -> runtime_pb2.Tensor:
        _check_float_input(self, tensor)
        requires_grad, tensor = tensor.requires_grad, tensor.detach()
        row_length = tensor.shape[-1] if tensor.ndim > 0 else 1
        numel, num_rows = tensor.numel(), math.prod(tensor.shape[:-1])
        stats_shape = (*tensor.shape[:-1], 1) if tensor.ndim > 0 else ()
        # the message buffer is assembled in place: float16 values, then float32 means, then float32 stds
        message_buffer = MessageBuffer(2 * numel + 8 * num_rows, tensor.device)
        packed = message_buffer.tensor
        half = packed[: 2 * numel].view(torch.float16).view(tensor.shape)

        work = tensor if tensor.dtype == torch.float32 else tensor.float()  # statistics in float32, as the original
        means = work.mean(dim=-1, keepdim=True)
        if allow_inplace or work is not tensor:
            centered = work.sub_(means)  # our own float32 copy, or the caller allows overwriting the input
        elif not work.is_contiguous():  # keep the input's memory layout: reductions below then sum in the same order
            centered = torch.sub(work, means)
        else:
            centered = torch.sub(work, means, out=empty_output(numel, torch.float32, work.device).view(work.shape))
        stds = torch.linalg.vector_norm(centered, dim=-1, keepdim=True)
        stds.div_(math.sqrt(max(row_length, 1))).clamp_min_(FP32_EPS)
        torch.div(centered, stds, out=half)
        means, stds = means.float().reshape(stats_shape), stds.float().reshape(stats_shape)
        packed[2 * numel : 2 * numel + 4 * num_rows].copy_(means.reshape(-1).view(torch.uint8))
        packed[2 * numel + 4 * num_rows :].copy_(stds.reshape(-1).view(torch.uint8))
        buffer = message_buffer.to_bytes()
        return self._message(tensor, buffer, requires_grad)

    def extract(self, serialized_tensor: runtime_pb2.Tensor) -> torch.Tensor:
        shape, numel = validated_shape(serialized_tensor)
        dtype = floating_output_dtype(serialized_tensor)
        num_rows = math.prod(shape[:-1])
        buffer = serialized_tensor.buffer
        expect_length(buffer, 2 * numel + 8 * num_rows, f"MEANSTD_16BIT tensor of shape {list(shape)}")
        stats_shape = (*shape[:-1], 1) if shape else ()
        half = read_array(buffer, 0, numel, torch.float16).reshape(shape)
        means = read_array(buffer, 2 * numel, num_rows, torch.float32).reshape(stats_shape)
        stds = read_array(buffer, 2 * numel + 4 * num_rows, num_rows, torch.float32).reshape(stats_shape)
        # cast to the output dtype, multiply, then add (no fused multiply-add): the same values as the original
        result = empty_output(numel, dtype).view(shape).copy_(half)
        return with_requires_grad(serialized_tensor, result.mul_(stds).add_(means))
