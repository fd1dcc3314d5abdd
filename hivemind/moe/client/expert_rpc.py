"""The expert RPCs as a client sees them: handle names, message types and the per-call wire helpers.

An expert server registers handlers named ``ConnectionHandler.rpc_*``; the class below only describes them so that
``ConnectionHandler.get_stub(p2p, peer_id)`` can call them (the server's own ConnectionHandler implements them).
"""

from __future__ import annotations

import asyncio
import math
import time
from functools import partial
from typing import AsyncIterator, Iterable, List, Optional, Sequence

import torch
from google.protobuf.message import DecodeError

from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.moe.wire_scan import Buffer, MessageScanError, scan_tensor_message
from hivemind.p2p import P2PContext, P2PTimeoutError, ServicerBase, StubBase, framing
from hivemind.p2p.framing import MIN_FRAME_RATE
from hivemind.p2p.servicer import get_handle_name
from hivemind.proto import runtime_pb2
from hivemind.utils.asyncio import attach_event_on_finished, cancel_and_wait
from hivemind.utils.nested import nested_flatten
from hivemind.utils.serializer import MSGPackSerializer
from hivemind.utils.streaming import combine_from_streaming, split_for_streaming
from hivemind.utils.tensor_descr import BatchTensorDescriptor

__all__ = [
    "ConnectionHandler",
    "MAX_UNARY_PAYLOAD_SIZE",
    "STREAMING_CHUNK_SIZE",
    "ExpertInfoError",
    "parse_expert_info",
    "serialize_inputs",
    "call_expert",
    "ExpertResponseTooLarge",
    "MalformedExpertResponse",
    "CheckedExpertResponse",
    "response_size_limit",
    "expected_output_bytes",
    "raw_size_of",
    "MAX_REMOTE_ERROR_CHARS",
    "shorten",
]

MAX_UNARY_PAYLOAD_SIZE = 2 * 1024**2  # raw bytes sent in one call above which the streaming variant is used
STREAMING_CHUNK_SIZE = 4 * 1024**2  # buffer bytes per streamed message
# one message of a streamed answer: a chunk (servers, ours and the original, send at most 4 MiB) and its metadata
MAX_RESPONSE_MESSAGE_BYTES = STREAMING_CHUNK_SIZE + 64 * 1024
MAX_REQUEST_MESSAGE_BYTES = STREAMING_CHUNK_SIZE + 64 * 1024  # one message of a streamed input, as sent here
# bytes per second at which the rest of a streamed answer must arrive once its first message came (on top of the
# call's timeout): what the p2p framing asks of one message
MIN_ANSWER_RATE = MIN_FRAME_RATE
# what each message and each chunk of a streamed answer costs on top of its buffer bytes (objects kept until the end)
_OVERHEAD_BYTES_PER_MESSAGE = 512


class ConnectionHandler(ServicerBase):
    """Description of the RPCs of an expert server (the name is part of each handle: ``ConnectionHandler.rpc_x``)."""

    async def rpc_info(self, uid_message: runtime_pb2.ExpertUID, _: P2PContext) -> runtime_pb2.ExpertInfo:
        raise NotImplementedError("this class only describes the expert RPCs; servers implement them")

    async def rpc_forward(self, call: runtime_pb2.ExpertRequest, _: P2PContext) -> runtime_pb2.ExpertResponse:
        raise NotImplementedError("this class only describes the expert RPCs; servers implement them")

    async def rpc_forward_stream(
        self, calls: AsyncIterator[runtime_pb2.ExpertRequest], _: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        raise NotImplementedError("this class only describes the expert RPCs; servers implement them")
        yield

    async def rpc_backward(self, call: runtime_pb2.ExpertRequest, _: P2PContext) -> runtime_pb2.ExpertResponse:
        raise NotImplementedError("this class only describes the expert RPCs; servers implement them")

    async def rpc_backward_stream(
        self, calls: AsyncIterator[runtime_pb2.ExpertRequest], _: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        raise NotImplementedError("this class only describes the expert RPCs; servers implement them")
        yield


# the most characters of an error text from a remote server kept in logs and exceptions (a hostile one can send MiBs)
MAX_REMOTE_ERROR_CHARS = 1000


def shorten(text: str, limit: Optional[int] = None) -> str:
    """``text``, or its first ``limit`` (MAX_REMOTE_ERROR_CHARS) characters and how long it was."""
    limit = MAX_REMOTE_ERROR_CHARS if limit is None else limit
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


class ExpertInfoError(ValueError):
    """An expert server answered rpc_info with something that is not a valid expert description."""


def _check_schema_leaves(schema, what: str) -> None:
    leaves = list(nested_flatten(schema))
    for leaf in leaves:
        if not isinstance(leaf, BatchTensorDescriptor):
            raise ExpertInfoError(f"{what} must contain only tensor descriptors, found {type(leaf).__name__}")


def parse_expert_info(serialized_info: bytes) -> dict:
    """Decode and check the info dict of an expert (forward_schema, outputs_schema, keyword_names)."""
    try:
        info = MSGPackSerializer.loads(serialized_info)
    except Exception as e:
        raise ExpertInfoError(f"expert info is not valid msgpack: {e}") from e
    if not isinstance(info, dict) or not {"forward_schema", "outputs_schema", "keyword_names"} <= info.keys():
        raise ExpertInfoError("expert info must be a map with forward_schema, outputs_schema and keyword_names")
    forward_schema = info["forward_schema"]
    if not (
        isinstance(forward_schema, (tuple, list))
        and len(forward_schema) == 2
        and isinstance(forward_schema[0], (tuple, list))
        and isinstance(forward_schema[1], dict)
    ):
        raise ExpertInfoError("expert forward_schema must be a pair (positional schemas, keyword schemas)")
    args_schema, kwargs_schema = tuple(forward_schema[0]), dict(forward_schema[1])
    if not all(isinstance(key, str) for key in kwargs_schema):
        raise ExpertInfoError("expert keyword schema names must be strings")
    _check_schema_leaves((args_schema, kwargs_schema), "forward_schema")
    _check_schema_leaves(info["outputs_schema"], "outputs_schema")
    keyword_names = info["keyword_names"]
    if not isinstance(keyword_names, (tuple, list)) or set(keyword_names) != set(kwargs_schema):
        raise ExpertInfoError(f"expert keyword_names {keyword_names!r} do not match its keyword schemas")
    return dict(info, forward_schema=(args_schema, kwargs_schema), keyword_names=tuple(keyword_names))


def serialize_inputs(tensors: Sequence[torch.Tensor], schema: Iterable) -> List[runtime_pb2.Tensor]:
    """Serialize CPU tensors, each with the compression of the matching descriptor of ``schema`` (flattened)."""
    descriptors = list(nested_flatten(schema))
    if len(descriptors) != len(tensors):
        raise TypeError(f"the expert expects {len(descriptors)} tensors, got {len(tensors)}")
    return [
        serialize_torch_tensor(tensor.detach().cpu(), descriptor.compression)
        for tensor, descriptor in zip(tensors, descriptors)
    ]


class _InputProgress:
    """When the p2p layer last asked a streamed input for its next message (it asks once the previous one was taken
    by the stream), how many buffer bytes it took so far, and whether the input went out whole (``sent``, set by
    attach_event_on_finished: the server may answer from then on)."""

    def __init__(self):
        self.asked_at, self.sent_bytes, self.sent = time.monotonic(), 0, asyncio.Event()

    def stalled_for(self) -> float:
        return time.monotonic() - self.asked_at


async def _iterate_requests(uid: str, serialized: Sequence[runtime_pb2.Tensor], progress: _InputProgress):
    for tensor in serialized:
        for chunk in split_for_streaming(tensor, STREAMING_CHUNK_SIZE):
            progress.asked_at = time.monotonic()
            yield runtime_pb2.ExpertRequest(uid=uid, tensors=[chunk])
            progress.sent_bytes += len(chunk.buffer)
    progress.asked_at = time.monotonic()


class ExpertResponseTooLarge(RuntimeError):
    """An expert server sent more tensor bytes than the answer to the request can need."""


class MalformedExpertResponse(ExpertResponseTooLarge):
    """An expert server's answer is not a valid answer to the call, whatever its size: more or fewer tensors than the
    expert returns, a message protobuf cannot parse, a tensor that does not decode, a streamed tensor cut short or
    given more chunks than it announced, gradients that do not match the inputs.

    It derives from ExpertResponseTooLarge only because earlier versions raised that for these answers too, so that an
    ``except ExpertResponseTooLarge`` written for them still catches it; catch MalformedExpertResponse to tell the
    two apart. The server does not follow the expert protocol (a bug, an incompatible version or a hostile peer):
    call another expert; a mixture of experts masks this one like any failed expert.
    """


_MALFORMED_ADVICE = (
    "its server does not follow the expert protocol (a bug, an incompatible version or a hostile peer); "
    "call another expert"
)


def malformed_answer(uid: str, method: str, problem: str) -> MalformedExpertResponse:
    """The error for an answer of expert ``uid`` to ``method`` that has ``problem``."""
    return MalformedExpertResponse(f"expert {uid} sent a malformed answer to {method}: {problem}; {_MALFORMED_ADVICE}")


class CheckedExpertResponse:
    """What a response is parsed into when its number of tensors is known: the wire bytes are scanned first (see
    hivemind/moe/wire_scan.py), so that a response of millions of empty tensors is refused before protobuf builds
    them; then parsed into ``message``, a ``runtime_pb2.ExpertResponse``."""

    __slots__ = ("max_tensors", "what", "message")

    def __init__(self, max_tensors: int, what: str):
        self.max_tensors, self.what = max_tensors, what
        self.message = None

    def ParseFromString(self, data: Buffer) -> int:  # noqa: N802 (protobuf's name)
        try:
            scan_tensor_message(data, self.max_tensors, self.what)
        except MessageScanError as e:  # too many tensors or fields for the expert's answer, or not protobuf at all
            raise MalformedExpertResponse(f"{e}; {_MALFORMED_ADVICE}") from None
        self.message = runtime_pb2.ExpertResponse()
        try:
            return self.message.ParseFromString(data)
        except DecodeError as e:  # well-formed fields, but not an ExpertResponse (e.g. field 0, a dtype not in UTF-8)
            raise MalformedExpertResponse(
                f"{self.what}: not a valid expert message ({e}); {_MALFORMED_ADVICE}"
            ) from None


def response_size_limit(expected_bytes: int) -> int:
    """Bytes an answer may carry: twice the uncompressed size it should have, plus 1 MiB for codec metadata."""
    return 2 * expected_bytes + 2**20


def expected_output_bytes(outputs_schema, batch_size: int) -> int:
    """Uncompressed bytes of the outputs of ``batch_size`` examples (8 bytes per element where dtype is unknown)."""
    total = 0
    for descriptor in nested_flatten(outputs_schema):
        itemsize = torch.empty(0, dtype=descriptor.dtype).element_size() if descriptor.dtype is not None else 8
        total += batch_size * math.prod(descriptor.shape[1:]) * itemsize
    return total


def _check_size(received: int, limit: Optional[int], uid: str) -> None:
    if limit is not None and received > limit:
        raise ExpertResponseTooLarge(
            f"expert {uid} answered with over {limit} bytes of tensors (each message and chunk counted as at least "
            f"{_OVERHEAD_BYTES_PER_MESSAGE} bytes), more than it can need"
        )


def _decode(uid: str, method: str, index: int, serialized: runtime_pb2.Tensor) -> torch.Tensor:
    try:
        return deserialize_torch_tensor(serialized)
    except (ValueError, TypeError, RuntimeError, OverflowError, IndexError) as e:
        raise malformed_answer(uid, method, f"tensor #{index} could not be decoded ({e})") from None


class _StreamedAnswer:
    """Joins the chunks of a streamed answer within its byte budget. A chunk with metadata starts a tensor and
    announces how many chunks it has (``chunks``; 0: not said): a tensor with fewer (the stream was cut) or more is
    malformed, as is a continuation chunk before any tensor or more tensors than the expert returns."""

    def __init__(self, uid: str, method: str, max_bytes: Optional[int], max_tensors: Optional[int]):
        self.uid, self.method, self.max_bytes, self.max_tensors = uid, method, max_bytes, max_tensors
        self.received = 0
        self.tensors: List[torch.Tensor] = []
        self.parts: List[runtime_pb2.Tensor] = []  # chunks of the tensor being received
        self.announced = 0

    def add(self, response: runtime_pb2.ExpertResponse) -> None:
        # every message and chunk is kept until its tensor is complete: each costs its overhead too, so that an
        # endless stream of empty messages or chunks runs out of the budget as well
        self.received += _OVERHEAD_BYTES_PER_MESSAGE * (1 + len(response.tensors))
        self.received += sum(len(chunk.buffer) for chunk in response.tensors)
        _check_size(self.received, self.max_bytes, self.uid)  # before the chunks are kept
        for chunk in response.tensors:
            if chunk.dtype:  # a chunk with metadata: a new tensor
                self._end_tensor()
                if self.max_tensors is not None and len(self.tensors) >= self.max_tensors:
                    raise malformed_answer(
                        self.uid,
                        self.method,
                        f"rpc_{self.method}_stream answer expects {self.max_tensors} tensors, got more",
                    )
                self.announced = max(chunk.chunks, 0)
            elif not self.parts:
                raise malformed_answer(self.uid, self.method, "a continuation chunk came before any tensor metadata")
            elif self.announced and len(self.parts) >= self.announced:
                raise malformed_answer(
                    self.uid,
                    self.method,
                    f"tensor #{len(self.tensors)} got more chunks than the {self.announced} it announced",
                )
            self.parts.append(chunk)

    def _end_tensor(self) -> None:
        if not self.parts:
            return
        if self.announced and len(self.parts) != self.announced:
            raise malformed_answer(
                self.uid,
                self.method,
                f"tensor #{len(self.tensors)} ended after {len(self.parts)} of the {self.announced} chunks it "
                "announced (the stream was cut short)",
            )
        serialized, self.parts = combine_from_streaming(self.parts), []
        self.tensors.append(_decode(self.uid, self.method, len(self.tensors), serialized))

    def finish(self) -> List[torch.Tensor]:
        self._end_tensor()
        return self.tensors


async def call_expert(
    stub: StubBase,
    method: str,
    uid: str,
    serialized: Sequence[runtime_pb2.Tensor],
    raw_size: int,
    timeout: Optional[float] = None,
    max_response_bytes: Optional[int] = None,
    max_response_tensors: Optional[int] = None,
    expected_response_size: int = 0,
) -> List[torch.Tensor]:
    """Send tensors to ``rpc_<method>`` (unary) or ``rpc_<method>_stream`` (above 2 MiB of raw bytes either way).

    :param raw_size: the summed ``element_size * numel`` of the tensors before compression, in bytes
    :param timeout: seconds for the unary variant's answer, or for each message of the streaming variant's answer
      (None: the P2P's ``unary_call_timeout`` for both, 300 s by default): a server that stops answering in the
      middle of a stream, or never starts, fails the call with P2PTimeoutError instead of holding it forever
    :param max_response_bytes: refuse (ExpertResponseTooLarge) an answer whose tensor buffers exceed this
    :param max_response_tensors: the number of tensors the answer holds (the expert's number of outputs, or of
      inputs for backward): a message with more is refused before it is parsed, and an answer with fewer too
      (MalformedExpertResponse, as for any answer that is not a valid one)
    :param expected_response_size: the raw bytes the answer should carry (e.g. the outputs of the batch): a unary
      answer travels in one message of at most 4 MiB, so an answer above 2 MiB is asked for by streaming too
    """
    if max(raw_size, expected_response_size) > MAX_UNARY_PAYLOAD_SIZE:
        name = f"rpc_{method}_stream"
        progress = _InputProgress()
        requests = attach_event_on_finished(_iterate_requests(uid, serialized, progress), progress.sent)
        responses = await _call(stub, name, uid, requests, max_response_tensors)
        answer = _StreamedAnswer(uid, method, max_response_bytes, max_response_tensors)
        if timeout is None and isinstance(stub, StubBase):
            timeout = stub._p2p.unary_call_timeout
        try:
            await _receive_answer(responses, answer, timeout, progress, f"{name} of {uid}")
        finally:
            if hasattr(responses, "aclose"):
                await responses.aclose()  # a refused answer: stop reading it now (the stream closes)
        tensors = answer.finish()
    else:
        request = runtime_pb2.ExpertRequest(uid=uid, tensors=serialized)
        response = await _call(stub, f"rpc_{method}", uid, request, max_response_tensors, timeout=timeout)
        response = getattr(response, "message", response)
        _check_size(sum(len(tensor.buffer) for tensor in response.tensors), max_response_bytes, uid)
        tensors = [_decode(uid, method, index, tensor) for index, tensor in enumerate(response.tensors)]
    if max_response_tensors is not None and len(tensors) < max_response_tensors:
        raise malformed_answer(uid, method, f"{len(tensors)} tensors instead of {max_response_tensors}")
    return tensors


async def _receive_answer(
    responses, answer: _StreamedAnswer, timeout: Optional[float], progress: _InputProgress, what: str
) -> None:
    """Feed ``answer`` every message of a streamed answer. With a ``timeout``, each message must come within it, and
    once the first one came, the rest within ``timeout`` plus the answer's byte budget at MIN_ANSWER_RATE (a server
    dripping tiny messages would otherwise hold the call for as many timeouts as its budget has messages). Until the
    input is sent whole (``progress``), each of its messages must be taken as fast as the p2p framing asks of one (a
    server that stops reading it would otherwise hold the call forever)."""
    iterator, finish_by = responses.__aiter__(), None
    while True:
        wait = timeout
        if finish_by is not None:
            wait = min(timeout, finish_by - time.monotonic())
        try:
            if wait is not None and wait <= 0:
                raise asyncio.TimeoutError()
            response = await _next_message(iterator, wait, progress)
        except StopAsyncIteration:
            return
        except _InputStalled as e:
            raise P2PTimeoutError(
                f"{what}: the server took no more of the input for {e.seconds:.0f} s (after {progress.sent_bytes} "
                "bytes of it); the call was cancelled"
            ) from None
        except asyncio.TimeoutError:
            if wait is not None and wait < timeout:
                raise P2PTimeoutError(
                    f"{what}: the answer did not complete in time ({answer.received} bytes so far, at most "
                    f"{answer.max_bytes} allowed); the call was cancelled"
                ) from None
            raise P2PTimeoutError(
                f"{what}: no message of the answer for {timeout} s after the input was sent (after "
                f"{answer.received} bytes of answer); the call was cancelled"
            ) from None
        if finish_by is None and timeout is not None and answer.max_bytes is not None:
            finish_by = time.monotonic() + timeout + answer.max_bytes / MIN_ANSWER_RATE
        answer.add(getattr(response, "message", response))


class _InputStalled(Exception):
    def __init__(self, seconds: float):
        self.seconds = seconds


async def _next_message(iterator: AsyncIterator, timeout: Optional[float], progress: _InputProgress):
    """The next message of a streamed answer; asyncio.TimeoutError once none came for ``timeout`` seconds while the
    input was sent whole (a server answers only after reading all of it, which a slow link may take long for), and
    _InputStalled while it was not, once the server took none of it for as long as one message may take."""
    waiting, started = asyncio.ensure_future(iterator.__anext__()), time.monotonic()
    sent = progress.sent
    input_ended = asyncio.ensure_future(sent.wait())
    try:
        while True:
            input_bound = framing.stall_bound(MAX_REQUEST_MESSAGE_BYTES)
            if not sent.is_set():
                deadline = progress.asked_at + input_bound
            else:  # (progress.asked_at: when the input ended)
                deadline = None if timeout is None else max(started, progress.asked_at) + timeout
            wait = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            watched = {waiting} if input_ended.done() else {waiting, input_ended}
            await asyncio.wait(watched, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
            if waiting.done():
                return waiting.result()
            if deadline is None or time.monotonic() < deadline:
                continue  # the input ended, or moved on, meanwhile
            if sent.is_set():
                raise asyncio.TimeoutError()
            raise _InputStalled(progress.stalled_for())
    finally:
        for task in (waiting, input_ended):
            if not task.done():
                await cancel_and_wait(task)


async def _call(stub: StubBase, name: str, uid: str, request, max_tensors: Optional[int], **kwargs):
    """``stub.<name>(request)``. A streamed answer's messages are limited to one chunk (as servers send them); with
    ``max_tensors``, each response is a CheckedExpertResponse (its ``message``)."""
    if not isinstance(stub, StubBase):
        return await getattr(stub, name)(request, **kwargs)
    handle = get_handle_name(stub._namespace, ConnectionHandler.__name__, name)
    response_type = runtime_pb2.ExpertResponse
    if max_tensors is not None:
        response_type = partial(CheckedExpertResponse, max_tensors, f"{name} answer of {uid}")
    if name.endswith("_stream"):
        return await stub._p2p.iterate_protobuf_handler(
            stub._peer, handle, request, response_type, max_message_size=MAX_RESPONSE_MESSAGE_BYTES
        )
    return await stub._p2p.call_protobuf_handler(stub._peer, handle, request, response_type, **kwargs)


def raw_size_of(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the tensors before compression (what decides between the unary and the streaming RPC)."""
    return sum(tensor.element_size() * tensor.numel() for tensor in tensors)
