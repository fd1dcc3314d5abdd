"""serialize_torch_tensor / deserialize_torch_tensor: the CompressionType -> codec registry."""

from __future__ import annotations

import math
from typing import AsyncIterator, Dict, Iterable, List, Optional

import torch

from hivemind.compression.base import (
    CompressionBase,
    CompressionInfo,
    NoCompression,
    TensorDecodeError,
    with_requires_grad,
)
from hivemind.compression.buffers import validated_shape
from hivemind.compression.floating import Float16Compression, ScaledFloat16Compression
from hivemind.compression.quantization import (
    BlockwiseQuantization,
    Quantile8BitQuantization,
    Uniform8BitQuantization,
)
from hivemind.proto import runtime_pb2

__all__ = ["BASE_COMPRESSION_TYPES", "serialize_torch_tensor", "deserialize_torch_tensor", "deserialize_tensor_stream"]

CompressionType = runtime_pb2.CompressionType
# room for what a codec adds besides the per-element and per-row data: headers, code books, per-block absmax is less
# than one byte per element (BLOCKWISE_8BIT: 16 + 4 * 256 bytes, then 4 bytes per 4096 elements)
_CODE_BOOK_ROOM = 4096

_ALL_CODECS = (
    NoCompression(),
    ScaledFloat16Compression(),
    Float16Compression(),
    Quantile8BitQuantization(),
    Uniform8BitQuantization(),
    BlockwiseQuantization(),
)
# CompressionType name -> the codec that writes and reads that type
BASE_COMPRESSION_TYPES: Dict[str, CompressionBase] = {
    CompressionType.Name(codec.compression_type): codec for codec in _ALL_CODECS
}
_CODECS_BY_TYPE: Dict[int, CompressionBase] = {codec.compression_type: codec for codec in _ALL_CODECS}
assert set(BASE_COMPRESSION_TYPES) == set(CompressionType.keys()), "every CompressionType needs a codec"


def serialize_torch_tensor(
    tensor: torch.Tensor,
    compression_type: int = CompressionType.NONE,
    info: Optional[CompressionInfo] = None,
    allow_inplace: bool = False,
    **kwargs,
) -> runtime_pb2.Tensor:
    """Serialize a CPU tensor with the codec of ``compression_type``; extra kwargs go to CompressionInfo."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(
            f"serialize_torch_tensor expects a torch.Tensor, got {type(tensor).__name__}: "
            f"convert it with torch.tensor(...)"
        )
    assert tensor.device == torch.device("cpu"), f"serialize_torch_tensor expects a CPU tensor, got {tensor.device}"
    if tensor.layout != torch.strided:
        raise TypeError(
            f"serialize_torch_tensor expects a dense tensor, got a {tensor.layout} one: "
            f"convert it with tensor.to_dense()"
        )
    codec = _CODECS_BY_TYPE.get(compression_type)
    if codec is None:
        raise ValueError(
            f"unknown compression type {compression_type!r}, expected one of {dict(CompressionType.items())}"
        )
    if info is None and (kwargs or codec.compress_reads_info):
        info = CompressionInfo.from_tensor(tensor, **kwargs)
    return codec.compress(tensor, info, allow_inplace)


def deserialize_torch_tensor(serialized_tensor: runtime_pb2.Tensor) -> torch.Tensor:
    """Restore a tensor (with its requires_grad flag); raises TensorDecodeError (a ValueError) for bad input."""
    if not isinstance(serialized_tensor, runtime_pb2.Tensor):
        hint = ": parse bytes with runtime_pb2.Tensor.FromString(data)" if isinstance(serialized_tensor, bytes) else ""
        raise TypeError(f"expected a runtime_pb2.Tensor message, got {type(serialized_tensor).__name__}{hint}")
    codec = _CODECS_BY_TYPE.get(serialized_tensor.compression)
    if codec is None:
        raise TensorDecodeError(f"serialized tensor has an unknown compression type {serialized_tensor.compression}")
    return with_requires_grad(serialized_tensor, codec.extract(serialized_tensor))  # also for codecs of users


def max_buffer_bytes(head: runtime_pb2.Tensor) -> int:
    """An upper bound on the buffer of the tensor that ``head`` (a first chunk, with metadata) describes, for every
    codec: 16 bytes per element (complex128), 8 per row (MEANSTD_16BIT statistics) and room for code books."""
    shape, numel = validated_shape(head)
    return 16 * numel + 8 * math.prod(shape[:-1]) + _CODE_BOOK_ROOM


async def deserialize_tensor_stream(
    stream: AsyncIterator[Iterable[runtime_pb2.Tensor]],
) -> List[torch.Tensor]:
    """Reassemble and decode tensors from a stream of chunk lists (as split_for_streaming cuts them).

    A chunk with a non-empty dtype starts a new tensor; chunks without one continue the current tensor. A tensor
    whose chunks bring more bytes than its shape allows (see :func:`max_buffer_bytes`) raises TensorDecodeError as
    soon as they do, without reading the rest of the stream.
    """
    tensors: List[torch.Tensor] = []
    head: Optional[runtime_pb2.Tensor] = None
    buffers: List[bytes] = []  # the current tensor's buffer pieces, the head's first
    received = limit = 0

    def finish() -> None:
        message = head  # a tensor sent in one chunk is that chunk
        if len(buffers) > 1:
            message = runtime_pb2.Tensor()
            message.CopyFrom(head)
            message.buffer = b"".join(buffers)
        tensors.append(deserialize_torch_tensor(message))

    async for parts in stream:
        for part in parts:
            if part.dtype:
                if head is not None:
                    finish()
                head, limit, received, buffers = part, max_buffer_bytes(part), 0, []
            elif head is None:
                raise TensorDecodeError("tensor stream: a continuation chunk arrived before any chunk with metadata")
            buffer = part.buffer
            received += len(buffer)
            if received > limit:
                raise TensorDecodeError(
                    f"tensor stream: the chunks of a tensor of shape {list(head.size)} brought {received} bytes, "
                    f"more than any codec's {limit}"
                )
            buffers.append(buffer)
    if head is not None:
        finish()
    return tensors
