"""Checks and (de)serialization of expert requests, done before anything reaches a task pool.

Everything here is plain logic over messages and tensors (no I/O), so that a malformed request is refused with a
message that names the problem, and a task that joins a batch is known to fit its schema.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence

import torch

from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.moe.server.module_backend import InvalidInputsError, check_inputs
from hivemind.moe.server.task_pool import TaskRejectedError
from hivemind.proto import runtime_pb2
from hivemind.utils.nested import nested_flatten
from hivemind.utils.streaming import combine_from_streaming, split_for_streaming
from hivemind.utils.tensor_descr import BatchTensorDescriptor

__all__ = [
    "ExpertRequestError",
    "IncompleteStreamError",
    "RequestBytesInFlight",
    "request_bytes",
    "refusals_named",
    "ExpertSchema",
    "StreamedRequest",
    "decode_tensors",
    "check_batch",
    "serialize_outputs",
    "split_into_responses",
    "STREAM_CHUNK_SIZE_BYTES",
]

STREAM_CHUNK_SIZE_BYTES = 4 * 1024**2  # buffer bytes per streamed message (what clients of the original send)
_SLACK_BYTES_PER_TENSOR = 64 * 1024  # codebooks / scales of compressed tensors on top of the raw element bytes
_ANSWER_SLACK_BYTES_PER_TENSOR = 4096  # what an answer's tensor may take beyond its elements (metadata, codebooks)
# what each stream message and each chunk costs on top of its buffer bytes (objects kept until the stream ends), so
# that an endless stream of empty messages or chunks also runs out of budget
_OVERHEAD_BYTES_PER_MESSAGE = 256
_MAX_UIDS_LISTED = 8


class ExpertRequestError(ValueError):
    """A request that cannot be served as it is; the message tells the caller what to fix."""


@dataclass(frozen=True)
class ExpertSchema:
    """What one hosted expert accepts: flat input / output descriptors and the batch-size limit."""

    uid: str
    inputs: Sequence[BatchTensorDescriptor]  # positional args, then keyword values by sorted name
    outputs: Sequence[BatchTensorDescriptor]
    max_batch_size: int

    @classmethod
    def from_backend(cls, uid: str, backend: Any) -> ExpertSchema:
        """Read the schemas of a ModuleBackend (its forward_schema, outputs_schema and pool limit)."""
        return cls(
            uid=uid,
            inputs=tuple(nested_flatten(backend.forward_schema)),
            outputs=tuple(nested_flatten(backend.outputs_schema)),
            max_batch_size=int(backend.forward_pool.max_batch_size),
        )

    @property
    def backward_inputs(self) -> Sequence[BatchTensorDescriptor]:
        """What rpc_backward receives: the forward inputs followed by the gradients of the outputs."""
        return (*self.inputs, *self.outputs)

    def max_request_bytes(self, backward: bool) -> int:
        """The most buffer bytes a valid request can carry (a stream above it is refused while it arrives)."""
        descriptors = self.backward_inputs if backward else self.inputs
        total = 0
        for descriptor in descriptors:
            instance_numel = 1
            for dim in descriptor.shape[1:]:
                instance_numel *= dim
            element_size = torch.empty((), dtype=descriptor.dtype or torch.float64).element_size()
            total += self.max_batch_size * instance_numel * max(element_size, 4) + _SLACK_BYTES_PER_TENSOR
        return total

    def answer_bytes(self, batch_size: int, backward: bool) -> int:
        """The most bytes the answer to a request of ``batch_size`` examples can hold while it is sent: its outputs
        (for backward, the gradients of its inputs) at 8 bytes per element where the dtype is not known."""
        total = 0
        for descriptor in self.inputs if backward else self.outputs:
            element_size = torch.empty((), dtype=descriptor.dtype or torch.float64).element_size()
            total += batch_size * math.prod(descriptor.shape[1:]) * element_size + _ANSWER_SLACK_BYTES_PER_TENSOR
        return total

    def max_call_bytes(self) -> int:
        """The most bytes one call can hold: the largest request (a backward one) and its answer."""
        return self.max_request_bytes(backward=True) + self.answer_bytes(self.max_batch_size, backward=True)


def unknown_uid_error(uid: str, hosted: Iterable[str]) -> ExpertRequestError:
    hosted = sorted(hosted)
    listed = ", ".join(hosted[:_MAX_UIDS_LISTED]) + (", ..." if len(hosted) > _MAX_UIDS_LISTED else "")
    return ExpertRequestError(f"unknown expert uid {uid[:200]!r}: this server hosts {len(hosted)} experts ({listed})")


def decode_tensors(serialized: Sequence[runtime_pb2.Tensor], expected: Sequence[BatchTensorDescriptor], what: str):
    """Decode the tensors of a request, refusing a wrong count before decoding anything."""
    if len(serialized) != len(expected):
        raise ExpertRequestError(f"{what} expects {len(expected)} tensors, got {len(serialized)}")
    tensors = []
    for index, message in enumerate(serialized):
        try:
            tensors.append(deserialize_torch_tensor(message))
        except (ValueError, TypeError, RuntimeError, OverflowError) as e:
            raise ExpertRequestError(f"{what}: tensor #{index} could not be decoded: {e}") from None
    return tensors


def check_batch(
    tensors: Sequence[torch.Tensor], expected: Sequence[BatchTensorDescriptor], max_batch_size: int, what: str
) -> int:
    """Check every tensor against its descriptor (the backend's own rules); return the batch size."""
    try:
        return check_inputs(tensors, expected, max_batch_size, what)
    except InvalidInputsError as e:
        raise ExpertRequestError(str(e)) from None


@contextlib.contextmanager
def refusals_named() -> Iterator[None]:
    """The error of a unary RPC reaches its caller as the exception's repr, that of a streamed RPC as its text alone:
    within this, a request refused as invalid (InvalidInputsError, TaskRejectedError) is raised again with its repr as
    its text, so that a client can tell a refused streamed request from a failure as it does a unary one."""
    try:
        yield
    except (InvalidInputsError, TaskRejectedError) as e:
        raise ExpertRequestError(repr(e)) from None


class IncompleteStreamError(ExpertRequestError):
    """A streamed request that ended before all of its tensors, or all the chunks of one, arrived: its caller
    stopped mid-stream (it died or dropped the connection). It is never computed."""


class StreamedRequest:
    """Collects the chunks of a streamed request (one uid, chunks of several tensors) within a byte budget.

    Completeness: the expert's schema says how many tensors a request holds, and the first chunk of each tensor says
    how many chunks it comes in (``chunks``, as every client sends it; 0: not said). A tensor given more chunks than
    it announced is refused at once; a stream that ends with fewer tensors or chunks than announced is incomplete
    (IncompleteStreamError from :meth:`combined`): its caller stopped mid-stream, and computing it would be wrong.
    """

    def __init__(self, hosted: Dict[str, ExpertSchema], backward: bool, what: str):
        self.hosted, self.backward, self.what = hosted, backward, what
        self.schema: Optional[ExpertSchema] = None
        self._tensors: List[List[runtime_pb2.Tensor]] = []  # chunks of each tensor
        self._announced: List[int] = []  # chunks announced by the first chunk of each tensor (0: not said)
        self._max_bytes = 0  # the most the stream may carry (set by its first message, from the expert's schema)
        self.received_bytes = 0  # buffer bytes and per-message overhead taken so far

    def add(self, request: runtime_pb2.ExpertRequest) -> None:
        """Take one message; raises ExpertRequestError as soon as the stream cannot be a valid request."""
        if self.schema is None:
            if request.uid not in self.hosted:
                raise unknown_uid_error(request.uid, self.hosted)
            self.schema = self.hosted[request.uid]
            self._max_bytes = self.schema.max_request_bytes(self.backward)
        elif request.uid != self.schema.uid:
            raise ExpertRequestError(
                f"{self.what}: every message of a stream must name the same expert, got {request.uid[:200]!r} "
                f"after {self.schema.uid!r}"
            )
        expected_count = self.expected_count
        self.received_bytes += _OVERHEAD_BYTES_PER_MESSAGE
        for chunk in request.tensors:
            self.received_bytes += len(chunk.buffer) + _OVERHEAD_BYTES_PER_MESSAGE
            if self.received_bytes > self._max_bytes:
                raise ExpertRequestError(
                    f"{self.what}: the stream carries more data than {self.schema.uid} accepts "
                    f"(max_batch_size={self.schema.max_batch_size})"
                )
            if chunk.dtype:
                if len(self._tensors) >= expected_count:
                    raise ExpertRequestError(f"{self.what} expects {expected_count} tensors, got more")
                self._tensors.append([chunk])
                self._announced.append(max(chunk.chunks, 0))
            elif not self._tensors:
                raise ExpertRequestError(f"{self.what}: the stream starts with a chunk that has no tensor metadata")
            elif 0 < self._announced[-1] <= len(self._tensors[-1]):
                raise ExpertRequestError(
                    f"{self.what}: tensor #{len(self._tensors) - 1} got more chunks than the {self._announced[-1]} "
                    "its first chunk announced"
                )
            else:
                self._tensors[-1].append(chunk)

    @property
    def expected_count(self) -> int:
        """How many tensors the request holds (its expert's inputs, and for backward the output gradients too)."""
        return len(self.schema.backward_inputs if self.backward else self.schema.inputs)

    def missing(self) -> Optional[str]:
        """What a stream that ended now would lack (None if it is complete)."""
        if self.schema is None:
            return None
        for index, (chunks, announced) in enumerate(zip(self._tensors, self._announced)):
            if announced and len(chunks) < announced:
                return f"tensor #{index} got {len(chunks)} of the {announced} chunks its first chunk announced"
        if len(self._tensors) < self.expected_count:
            return f"expects {self.expected_count} tensors, got {len(self._tensors)}"
        return None

    def combined(self) -> List[runtime_pb2.Tensor]:
        """One message per tensor, once the stream has ended."""
        if self.schema is None:
            raise ExpertRequestError(f"{self.what}: the stream ended without any message")
        missing = self.missing()
        if missing is not None:
            raise IncompleteStreamError(
                f"{self.what} of {self.schema.uid}: {missing} when the stream ended (its caller stopped mid-stream, "
                "or sent too little); the request is dropped: send every chunk of every tensor, then end the stream"
            )
        return [combine_from_streaming(chunks) for chunks in self._tensors]


def serialize_outputs(
    tensors: Sequence[torch.Tensor], descriptors: Sequence[BatchTensorDescriptor]
) -> List[runtime_pb2.Tensor]:
    """Serialize results with the compression of their descriptors (tensors are moved to CPU first)."""
    if len(tensors) != len(descriptors):
        raise RuntimeError(f"the expert returned {len(tensors)} tensors, its schema describes {len(descriptors)}")
    return [
        serialize_torch_tensor(tensor.detach().cpu(), descriptor.compression, allow_inplace=True)
        for tensor, descriptor in zip(tensors, descriptors)
    ]


def split_into_responses(
    serialized: Sequence[runtime_pb2.Tensor], chunk_size_bytes: int = STREAM_CHUNK_SIZE_BYTES
) -> Iterator[runtime_pb2.ExpertResponse]:
    """Streamed answer: one ExpertResponse per chunk of each tensor."""
    for tensor in serialized:
        for chunk in split_for_streaming(tensor, chunk_size_bytes):
            yield runtime_pb2.ExpertResponse(tensors=[chunk])


class RequestBytesInFlight:
    """Bytes of the expert requests that a handler holds at once (received, being checked or waiting for their
    task), in all and per caller, so that many concurrent requests or streams (each within its own limits) cannot
    together exhaust the server's memory. A request that would go over a limit is refused at once with an error
    that says so; its bytes were already received, so the refusal bounds what is *kept*.

    Used from one event loop (a handler thread or process): no locking.
    """

    def __init__(self, total: int, per_peer: int):
        self.total, self.per_peer = total, per_peer
        self.used = 0
        self.used_by_peer: Dict[Any, int] = {}

    def reserve(self, peer: Any, size: int, what: str) -> None:
        """Count ``size`` more bytes held for ``peer``, or raise ExpertRequestError if that goes over a limit."""
        peer_used = self.used_by_peer.get(peer, 0)
        if peer_used + size > self.per_peer:
            raise ExpertRequestError(
                f"{what}: your requests in progress on this server would hold over {self.per_peer} bytes; "
                "wait for some of them to finish before sending more"
            )
        if self.used + size > self.total:
            raise ExpertRequestError(
                f"{what}: the server holds over {self.total} bytes of requests in progress; try again later"
            )
        self.used += size
        self.used_by_peer[peer] = peer_used + size

    def release(self, peer: Any, size: int) -> None:
        self.used -= size
        left = self.used_by_peer.get(peer, 0) - size
        if left > 0:
            self.used_by_peer[peer] = left
        else:
            self.used_by_peer.pop(peer, None)


def request_bytes(serialized: Sequence[runtime_pb2.Tensor]) -> int:
    """What a unary request counts toward RequestBytesInFlight: its buffers plus the per-message overhead."""
    return _OVERHEAD_BYTES_PER_MESSAGE * (1 + len(serialized)) + sum(len(tensor.buffer) for tensor in serialized)
