"""Checking that a state download is whole, message by message (no I/O): :class:`StateAssembler`.

The protocol sends no tensor count, so the assembler holds a donor's stream to what its own messages announce (each
tensor's chunk count and shape) and, when the caller knows it, to the expected tensors; and it refuses at once what
no real state needs (too many dimensions, bytes or chunks for a tensor's shape). Used by
:mod:`hivemind.averaging.state_download`.
"""

from __future__ import annotations

import math
from typing import Any, List, Optional, Sequence, Tuple

import torch

from hivemind.compression import deserialize_torch_tensor
from hivemind.compression.buffers import MAX_NDIM
from hivemind.proto import averaging_pb2, runtime_pb2
from hivemind.utils.serializer import MSGPackSerializer
from hivemind.utils.streaming import combine_from_streaming

__all__ = [
    "StateAssembler",
    "StateDownloadError",
    "decode_chunks",
    "DEFAULT_MAX_UNCHECKED_STATE_BYTES",
    "MAX_UNCHECKED_TENSORS",
    "MIN_AVERAGE_CHUNK_BYTES",
]

# without expected_tensors, a donor may send at most this many tensor bytes before it is rejected
DEFAULT_MAX_UNCHECKED_STATE_BYTES = 16 * 2**30
# and at most this many tensors (each costs some 400 bytes of bookkeeping however small it is; an optimizer's state
# for a model of 10,000 parameter tensors has about 30,000)
MAX_UNCHECKED_TENSORS = 2**18
MIN_AVERAGE_CHUNK_BYTES = 1024  # a tensor comes in at most (its largest encoding / this) + 1 chunks (donors: 64 KiB)


def _max_encoded_bytes(numel: int) -> int:
    """An upper bound on the serialized size of a tensor with ``numel`` elements under any codec: 16 bytes per
    element (complex128) plus room for codebooks and per-block scales."""
    return 16 * numel + 2**16


class StateDownloadError(Exception):
    """One donor's download was rejected (incomplete, malformed or not matching the expected tensors)."""


class StateAssembler:
    """Rebuilds one donor's state from its ``DownloadData`` messages, checking that it is complete (no I/O).

    Feed messages with :meth:`add`; it returns the chunks of each tensor as soon as its last chunk is known to have
    arrived (when the next tensor starts) so that the caller can join and decode them (:func:`decode_chunks`);
    :meth:`finish` returns the last tensor's chunks after the stream ended. :meth:`check_decoded` validates a
    decoded tensor against ``expected_tensors``.

    :param expected_tensors: objects with ``.shape`` and ``.dtype`` (tensors, TensorDescriptors) that the state must
      match exactly, or None to accept any number and shape of tensors
    :param optional_tail: the last this many of ``expected_tensors`` may be missing altogether: a state of exactly
      the ones before them is whole too (e.g. a training state without optimizer statistics); fewer than that, or
      some of the tail only, is still refused
    :param max_bytes: refuse a state with more tensor bytes than this (default: what ``expected_tensors`` allows,
      or DEFAULT_MAX_UNCHECKED_STATE_BYTES); without ``expected_tensors``, more than MAX_UNCHECKED_TENSORS tensors
      are refused too
    """

    def __init__(
        self, expected_tensors: Optional[Sequence[Any]] = None, max_bytes: Optional[int] = None, optional_tail: int = 0
    ):
        self.expected = None
        if expected_tensors is not None:
            self.expected = [(tuple(t.shape), t.dtype) for t in expected_tensors]
        if not isinstance(optional_tail, int) or not 0 <= optional_tail <= len(self.expected or ()):
            raise ValueError(
                f"optional_tail must be an int from 0 to the number of expected tensors, got {optional_tail}"
            )
        self.optional_tail = optional_tail
        if max_bytes is None:
            if self.expected is None:
                max_bytes = DEFAULT_MAX_UNCHECKED_STATE_BYTES
            else:
                max_bytes = sum(_max_encoded_bytes(math.prod(shape)) for shape, _ in self.expected)
        self.max_bytes = max_bytes
        self.metadata: Any = None
        self.num_messages = 0
        self.num_tensors = 0  # tensors started so far
        self.received_bytes = 0
        self._parts: List[runtime_pb2.Tensor] = []
        self._announced_chunks = 0  # chunks the current tensor's first chunk announced (0: not said)
        self._tensor_limit = 0  # bytes the current tensor may have
        self._tensor_bytes = 0  # bytes the current tensor got so far
        self._shape: Tuple[int, ...] = ()  # the current tensor's shape, as its first chunk announced it

    def add(self, message: averaging_pb2.DownloadData) -> Optional[List[runtime_pb2.Tensor]]:
        """Take one message; returns the previous tensor's chunks if this one starts a new tensor, else None.
        Raises StateDownloadError for a malformed stream."""
        self.num_messages += 1
        if self.num_messages == 1:
            if not message.metadata:
                raise StateDownloadError("the first message carries no metadata")
            try:
                self.metadata = MSGPackSerializer.loads(message.metadata)
            except Exception as e:
                raise StateDownloadError(f"undecodable metadata ({len(message.metadata)} bytes): {e}") from None
        elif message.metadata:
            raise StateDownloadError(f"message {self.num_messages} carries metadata; only the first one may")
        if not message.HasField("tensor_part"):
            if self.num_messages == 1:
                return None  # metadata only (a state without tensors, or metadata sent apart)
            raise StateDownloadError(f"message {self.num_messages} carries no tensor chunk")
        chunk = message.tensor_part
        finished = None
        if chunk.dtype:  # the first chunk of a new tensor
            finished = self._finish_tensor() if self._parts else None
            self._start_tensor(chunk)
        elif not self._parts:
            raise StateDownloadError(f"message {self.num_messages} continues a tensor that never started")
        elif self._announced_chunks and len(self._parts) >= self._announced_chunks:
            raise StateDownloadError(
                f"tensor {self.num_tensors - 1} got more chunks than the {self._announced_chunks} it announced"
            )
        self._parts.append(chunk)
        if len(self._parts) > self._tensor_limit // MIN_AVERAGE_CHUNK_BYTES + 1:  # e.g. a flood of empty chunks
            raise StateDownloadError(
                f"tensor {self.num_tensors - 1} came in more chunks ({len(self._parts)}) than its size can need"
            )
        size = chunk.ByteSize()  # (reading .buffer would copy it) the buffer plus a few bytes of fields
        self.received_bytes += size
        self._tensor_bytes += size
        if self._tensor_bytes > self._tensor_limit:
            raise StateDownloadError(
                f"tensor {self.num_tensors - 1} of shape {list(self._shape)} got "
                f"{self._tensor_bytes} bytes, more than any encoding of it needs ({self._tensor_limit})"
            )
        if self.received_bytes > self.max_bytes:
            raise StateDownloadError(f"the state exceeds {self.max_bytes} bytes; refusing the rest")
        return finished

    def _start_tensor(self, head: runtime_pb2.Tensor) -> None:
        index = self.num_tensors
        if len(head.size) > MAX_NDIM:  # before making a tuple of them (or a product: a 1 MB shape takes minutes)
            raise StateDownloadError(f"tensor {index} has {len(head.size)} dimensions, at most {MAX_NDIM} can be real")
        shape = tuple(head.size)
        if any(dim < 0 for dim in shape):
            raise StateDownloadError(f"tensor {index} has a negative dimension: {list(shape)}")
        if self.expected is None and index >= MAX_UNCHECKED_TENSORS:
            raise StateDownloadError(f"the donor sends more than {MAX_UNCHECKED_TENSORS} tensors; refusing the rest")
        if self.expected is not None:
            if index >= len(self.expected):
                raise StateDownloadError(f"the donor sends more tensors than the {len(self.expected)} expected")
            expected_shape = self.expected[index][0]
            if shape != expected_shape:
                raise StateDownloadError(f"tensor {index} has shape {list(shape)}, expected {list(expected_shape)}")
        self.num_tensors += 1
        self._announced_chunks = max(head.chunks, 0)
        self._tensor_limit = _max_encoded_bytes(math.prod(shape))
        self._tensor_bytes = 0
        self._shape = shape

    def _finish_tensor(self) -> List[runtime_pb2.Tensor]:
        if self._announced_chunks and len(self._parts) != self._announced_chunks:
            raise StateDownloadError(
                f"tensor {self.num_tensors - 1} ended after {len(self._parts)} of the {self._announced_chunks} "
                "chunks it announced (the stream was cut)"
            )
        parts, self._parts = self._parts, []
        return parts

    def finish(self) -> Optional[List[runtime_pb2.Tensor]]:
        """Call when the stream ended; returns the last tensor's chunks (if any) and checks the tensor count."""
        if self.num_messages == 0:
            raise StateDownloadError("the donor sent nothing (it does not share its state)")
        last = self._finish_tensor() if self._parts else None
        if self.expected is not None and self.num_tensors != len(self.expected):
            shorter = len(self.expected) - self.optional_tail
            if not (self.optional_tail and self.num_tensors == shorter):
                also = f" (or {shorter}, without the optional last {self.optional_tail})" if self.optional_tail else ""
                raise StateDownloadError(
                    f"the stream ended after {self.num_tensors} of {len(self.expected)} expected tensors{also}: the "
                    "donor's state has fewer tensors than ours (another model or optimizer, or optimizer statistics "
                    "that one of us has and the other has not), or its stream was cut"
                )
        return last

    def check_decoded(self, index: int, tensor: torch.Tensor) -> None:
        """Raise StateDownloadError unless decoded tensor ``index`` matches what is expected of it: its shape, and its
        dtype, or another floating-point one (a donor that keeps its model in another precision: the value is cast
        into ours, as a copy into the local tensor does)."""
        if self.expected is None:
            return
        shape, dtype = self.expected[index]
        if tuple(tensor.shape) != shape or (dtype is not None and not _fits_dtype(tensor.dtype, dtype)):
            raise StateDownloadError(
                f"tensor {index} decoded to {tensor.dtype} {list(tensor.shape)}, expected {dtype} {list(shape)}"
            )

    def check_cast(self, index: int, theirs: torch.Tensor, ours: torch.Tensor) -> None:
        """Raise StateDownloadError if decoded tensor ``index`` (``theirs``), cast into our dtype (``ours``), got inf
        where it held a finite value: beyond the range of our precision (e.g. 1e300 for float32, 1e6 for float16)."""
        if theirs.dtype == ours.dtype or not ours.is_floating_point() or bool(torch.isfinite(ours).all()):
            return
        overflow = torch.isfinite(theirs) & ~torch.isfinite(ours)
        if bool(overflow.any()):
            largest = float(theirs[overflow].abs().max())
            raise StateDownloadError(
                f"tensor {index} holds values beyond the range of {ours.dtype} (up to {largest:.3g} in the donor's "
                f"{theirs.dtype}), which would become inf in ours"
            )


def _fits_dtype(theirs: torch.dtype, ours: Any) -> bool:
    if theirs == ours:
        return True
    return isinstance(ours, torch.dtype) and theirs.is_floating_point and ours.is_floating_point


def decode_chunks(chunks: List[runtime_pb2.Tensor]) -> torch.Tensor:
    """Join one tensor's chunks and decode it (CPU work: the download runs it in a thread)."""
    return deserialize_torch_tensor(combine_from_streaming(chunks))
