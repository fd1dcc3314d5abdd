"""Splitting serialized tensors into chunks for streaming RPCs and joining them back."""

from __future__ import annotations

from typing import Iterable, Iterator, List

from hivemind.proto import runtime_pb2

__all__ = ["STREAMING_CHUNK_SIZE_BYTES", "split_for_streaming", "combine_from_streaming"]

STREAMING_CHUNK_SIZE_BYTES = 2**16


def split_for_streaming(
    serialized_tensor: runtime_pb2.Tensor, chunk_size_bytes: int = STREAMING_CHUNK_SIZE_BYTES
) -> Iterator[runtime_pb2.Tensor]:
    """Split a serialized tensor into messages with at most ``chunk_size_bytes`` bytes of buffer each.

    The first message carries the metadata (compression, size, dtype, requires_grad) and the total number of
    chunks; the others carry only their piece of the buffer. A tensor with an empty buffer is one message
    (whose ``chunks`` is 0).
    """
    if chunk_size_bytes <= 0:
        raise ValueError(f"chunk_size_bytes must be positive, got {chunk_size_bytes}")
    data = memoryview(serialized_tensor.buffer)  # one copy out of the message, then zero-copy slices
    offsets = range(0, max(len(data), 1), chunk_size_bytes)
    for index, offset in enumerate(offsets):
        piece = runtime_pb2.Tensor(buffer=data[offset : offset + chunk_size_bytes].tobytes())
        if index == 0:  # the head chunk describes the whole tensor
            piece.chunks = -(-len(data) // chunk_size_bytes)  # 0 for an empty buffer, as the original sends
            piece.size.extend(serialized_tensor.size)
            piece.dtype = serialized_tensor.dtype
            piece.requires_grad = serialized_tensor.requires_grad
            piece.compression = serialized_tensor.compression
        yield piece


def combine_from_streaming(stream: Iterable[runtime_pb2.Tensor]) -> runtime_pb2.Tensor:
    """Join the chunks of ONE tensor (as made by :func:`split_for_streaming`) back into a single message.

    Raises ValueError if there are no chunks or if the first chunk has no metadata (empty ``dtype``).
    """
    parts: List[runtime_pb2.Tensor] = list(stream)
    if not parts:
        raise ValueError("combine_from_streaming needs at least one chunk, got none")
    head = parts[0]
    if not head.dtype:
        raise ValueError("the first chunk of a streamed tensor must carry its metadata (non-empty dtype)")
    serialized_tensor = runtime_pb2.Tensor()
    serialized_tensor.CopyFrom(head)
    if len(parts) > 1:
        serialized_tensor.buffer = b"".join(part.buffer for part in parts)
    return serialized_tensor
