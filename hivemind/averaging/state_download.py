"""The receiving side of state sharing: choose donors from the DHT and download a complete state from one of them.

The protocol sends no tensor count: the stream just ends after the last chunk, and a donor that dies between two
tensors looks the same as one that finished. So a download is accepted only when it is provably whole: every
tensor got exactly the number of chunks its first chunk announced and decodes to its announced shape, and, when
the caller knows what the state should look like (``expected_tensors``, e.g. the averager's own state), the tensors
match it in number, shape and dtype. Anything else (a broken or stalled stream, garbage metadata, a wrong shape)
rejects that donor and the next one is tried; a partial state is never returned. So does a donor that sends slower
than a floor on its pace (:mod:`hivemind.averaging.state_rate`), and one whose message exceeds MAX_MESSAGE_BYTES.

The tensors of a downloaded state are views of one shared-memory buffer (written in place as they are decoded when
the expected shapes and dtypes are known): they reach the user's process as one file descriptor, not one per tensor.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from typing import Any, AsyncIterator, Iterable, List, Optional, Sequence, Tuple, Type

import torch

from hivemind.averaging.state_rate import DEFAULT_MIN_RATE, DEFAULT_RATE_GRACE, RateFloor
from hivemind.averaging.state_snapshot import empty_packed, packed_copy
from hivemind.compression import deserialize_torch_tensor
from hivemind.compression.buffers import MAX_NDIM
from hivemind.dht import DHT
from hivemind.p2p import P2P, PeerID
from hivemind.p2p.servicer import ServicerBase, get_handle_name
from hivemind.proto import averaging_pb2, runtime_pb2
from hivemind.utils.asyncio import await_with_timeout
from hivemind.utils.logging import get_logger
from hivemind.utils.serializer import MSGPackSerializer
from hivemind.utils.streaming import combine_from_streaming

__all__ = [
    "load_state_from_peers",
    "order_donors",
    "StateAssembler",
    "StateDownloadError",
    "decode_chunks",
    "download_state",
    "DEFAULT_STALL_TIMEOUT",
    "DEFAULT_MAX_UNCHECKED_STATE_BYTES",
]

logger = get_logger(__name__)

DEFAULT_STALL_TIMEOUT = 60.0  # seconds between two messages of a download when neither timeout is given
# seconds at least for a donor's first message: it may queue a download for up to 10 s (DEFAULT_MAX_QUEUE_WAIT of
# state_sharing), wait up to 5 s for its next snapshot (MAX_SNAPSHOT_PAUSE of state_snapshot) and then take a snapshot
# of its state (a copy in its user's process) before it sends anything
DONOR_PREPARATION_TIMEOUT = 25.0
DHT_LOOKUP_TIMEOUT = 30.0  # seconds for finding the donors when the caller gave no overall timeout
# without expected_tensors, a donor may send at most this many tensor bytes before it is rejected
DEFAULT_MAX_UNCHECKED_STATE_BYTES = 16 * 2**30
# and at most this many tensors (each costs some 400 bytes of bookkeeping however small it is; an optimizer's state
# for a model of 10,000 parameter tensors has about 30,000)
MAX_UNCHECKED_TENSORS = 2**18
MAX_PEER_ID_BYTES = 128
# a donor's message is a 64 KiB chunk, and the first one the state's metadata besides: a larger message is refused
# before it is read (an optimizer's metadata takes about a hundred bytes per tensor of its state)
MAX_MESSAGE_BYTES = 32 * 2**20
MIN_AVERAGE_CHUNK_BYTES = 1024  # a tensor comes in at most (its largest encoding / this) + 1 chunks (donors: 64 KiB)


def _max_encoded_bytes(numel: int) -> int:
    """An upper bound on the serialized size of a tensor with ``numel`` elements under any codec: 16 bytes per
    element (complex128) plus room for codebooks and per-block scales."""
    return 16 * numel + 2**16


class StateDownloadError(Exception):
    """One donor's download was rejected (incomplete, malformed or not matching the expected tensors)."""


def order_donors(
    entries: Any, own_peer_id: Optional[PeerID], rng: Optional[random.Random] = None
) -> List[Tuple[PeerID, float]]:
    """Donors from a ``get(<prefix>.all_averagers, latest=True)`` result, best first.

    Only entries with a finite numeric priority count (None or anything else means "does not share"); ties are
    broken at random; our own entry is skipped. Returns ``[(peer_id, priority), ...]``.
    """
    rng = rng if rng is not None else random.Random()
    value = getattr(entries, "value", None)
    if not isinstance(value, dict):
        return []
    donors = []
    for subkey, entry in value.items():
        priority = getattr(entry, "value", None)
        if not isinstance(subkey, bytes) or not 0 < len(subkey) <= MAX_PEER_ID_BYTES:
            continue
        if isinstance(priority, bool) or not isinstance(priority, (int, float)) or not math.isfinite(priority):
            continue
        peer_id = PeerID(subkey)
        if own_peer_id is not None and peer_id == own_peer_id:
            continue
        donors.append((float(priority), rng.random(), peer_id))
    donors.sort(key=lambda item: item[:2], reverse=True)
    return [(peer_id, priority) for priority, _, peer_id in donors]


class StateAssembler:
    """Rebuilds one donor's state from its ``DownloadData`` messages, checking that it is complete (no I/O).

    Feed messages with :meth:`add`; it returns the chunks of each tensor as soon as its last chunk is known to have
    arrived (when the next tensor starts) so that the caller can join and decode them (:func:`decode_chunks`);
    :meth:`finish` returns the last tensor's chunks after the stream ended. :meth:`check_decoded` validates a
    decoded tensor against ``expected_tensors``.

    :param expected_tensors: objects with ``.shape`` and ``.dtype`` (tensors, TensorDescriptors) that the state must
      match exactly, or None to accept any number and shape of tensors
    :param max_bytes: refuse a state with more tensor bytes than this (default: what ``expected_tensors`` allows,
      or DEFAULT_MAX_UNCHECKED_STATE_BYTES); without ``expected_tensors``, more than MAX_UNCHECKED_TENSORS tensors
      are refused too
    """

    def __init__(self, expected_tensors: Optional[Sequence[Any]] = None, max_bytes: Optional[int] = None):
        self.expected = None
        if expected_tensors is not None:
            self.expected = [(tuple(t.shape), t.dtype) for t in expected_tensors]
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
            raise StateDownloadError(
                f"the stream ended after {self.num_tensors} of {len(self.expected)} expected tensors"
            )
        return last

    def check_decoded(self, index: int, tensor: torch.Tensor) -> None:
        """Raise StateDownloadError unless decoded tensor ``index`` matches what is expected of it."""
        if self.expected is None:
            return
        shape, dtype = self.expected[index]
        if tuple(tensor.shape) != shape or (dtype is not None and tensor.dtype != dtype):
            raise StateDownloadError(
                f"tensor {index} decoded to {tensor.dtype} {list(tensor.shape)}, expected {dtype} {list(shape)}"
            )


def decode_chunks(chunks: List[runtime_pb2.Tensor]) -> torch.Tensor:
    """Join one tensor's chunks and decode it (CPU work: the download runs it in a thread)."""
    return deserialize_torch_tensor(combine_from_streaming(chunks))


def _shared_outputs(expected: Optional[Sequence[Tuple[Tuple[int, ...], Any]]]) -> Optional[List[torch.Tensor]]:
    """Views of one new shared buffer, one per expected tensor (our own shapes, not the donor's), or None when the
    expected tensors or some of their dtypes are unknown."""
    if expected is None or any(not isinstance(dtype, torch.dtype) for _, dtype in expected):
        return None
    return empty_packed(expected)


def _decode_checked(
    assembler: StateAssembler, index: int, chunks: List[runtime_pb2.Tensor], out: Optional[torch.Tensor]
) -> torch.Tensor:
    """Decode one tensor, check it against the expected one and (if given) copy it into ``out`` (in a thread)."""
    tensor = decode_chunks(chunks)
    assembler.check_decoded(index, tensor)
    if out is None:
        return tensor
    out.copy_(tensor)
    return out


async def download_state(
    p2p: P2P,
    donor: PeerID,
    *,
    prefix: str,
    servicer_type: Type[ServicerBase],
    expected_tensors: Optional[Sequence[Any]] = None,
    max_bytes: Optional[int] = None,
    message_timeout: Optional[float] = None,
    deadline: Optional[float] = None,
    first_message_timeout: Optional[float] = None,
    min_rate: Optional[float] = DEFAULT_MIN_RATE,
    rate_grace: float = DEFAULT_RATE_GRACE,
) -> Tuple[Any, List[torch.Tensor]]:
    """Download and validate one donor's state; raises (StateDownloadError, P2P errors, TimeoutError) on failure.

    :param message_timeout: seconds allowed for each next message (None: no limit besides ``deadline``)
    :param first_message_timeout: seconds allowed for the first message, which the donor sends only once it had a
      free slot and a snapshot of its state (None: ``message_timeout``)
    :param deadline: ``time.monotonic()`` by which the whole download must end
    :param min_rate: after its first message, a donor that we waited on for longer than ``rate_grace`` plus one
      second per ``min_rate`` bytes it sent is abandoned (None: no floor; see :mod:`hivemind.averaging.state_rate`):
      one that sends a chunk just before every ``message_timeout`` would otherwise hold a newcomer without an overall
      deadline for hours. Checked as each message arrives; a single wait is bounded by ``message_timeout``
    :param rate_grace: seconds of waiting on the donor allowed on top of what its pace earns
    """
    RateFloor(min_rate, rate_grace)  # validates both
    assembler = StateAssembler(expected_tensors, max_bytes)
    loop = asyncio.get_running_loop()
    tensors: List[torch.Tensor] = []
    outputs = _shared_outputs(assembler.expected)  # where decoded tensors go (None: packed at the end)
    decoding: Optional[asyncio.Future] = None  # at most one tensor is decoded while the next one arrives

    async def collect_decoded() -> None:
        nonlocal decoding
        if decoding is None:
            return
        index, future, decoding = len(tensors), decoding, None
        try:
            tensor = await future
        except ValueError as e:  # TensorDecodeError and friends
            raise StateDownloadError(f"tensor {index} cannot be decoded: {e}") from None
        tensors.append(tensor)

    async def decode_in_background(chunks: List[runtime_pb2.Tensor]) -> None:
        nonlocal decoding
        await collect_decoded()
        index = len(tensors)
        out = outputs[index] if outputs is not None and index < len(outputs) else None
        decoding = loop.run_in_executor(None, _decode_checked, assembler, index, chunks, out)

    floor: Optional[RateFloor] = None  # how fast the donor sends (from its first message on)
    handler = get_handle_name(prefix, servicer_type.__name__, "rpc_download_state")
    stream: AsyncIterator[averaging_pb2.DownloadData] = await p2p.iterate_protobuf_handler(
        donor, handler, averaging_pb2.DownloadRequest(), averaging_pb2.DownloadData, max_message_size=MAX_MESSAGE_BYTES
    )
    try:
        while True:
            timeout = message_timeout
            if assembler.num_messages == 0 and first_message_timeout is not None:
                timeout = first_message_timeout
            if deadline is not None:
                remaining = max(deadline - time.monotonic(), 0.0)
                timeout = remaining if timeout is None else min(timeout, remaining)
            if floor is not None:
                floor.wait_started(time.monotonic())
            try:
                message = await await_with_timeout(stream.__anext__(), timeout)
            except StopAsyncIteration:
                break
            except asyncio.TimeoutError:
                raise asyncio.TimeoutError(
                    f"no message from the donor for {timeout:.1f} s after {assembler.num_messages} messages"
                ) from None
            if floor is None:  # the floor starts after the first message, which the donor may prepare for long
                floor = RateFloor(min_rate, rate_grace)
            else:
                now = time.monotonic()
                floor.wait_ended(now, message.ByteSize())
                too_slow = floor.check(now)
                if too_slow is not None:
                    raise StateDownloadError(f"the donor sends too slowly: {too_slow}")
            finished = assembler.add(message)
            if finished is not None:
                await decode_in_background(finished)
        last = assembler.finish()
        if last is not None:
            await decode_in_background(last)
        await collect_decoded()
    finally:
        await stream.aclose()
        if decoding is not None:  # failed part-way: let the thread finish, drop its result
            await asyncio.gather(decoding, return_exceptions=True)
    if outputs is None:  # one shared buffer for the whole state all the same (one copy)
        tensors = await loop.run_in_executor(None, packed_copy, tensors)
    return assembler.metadata, tensors


async def load_state_from_peers(
    *,
    p2p: P2P,
    dht: DHT,
    prefix: str,
    servicer_type: Type[ServicerBase],
    own_peer_id: Optional[PeerID] = None,
    expected_tensors: Optional[Sequence[Any]] = None,
    timeout: Optional[float] = None,
    request_timeout: float = 3.0,
    next_chunk_timeout: Optional[float] = None,
    max_bytes: Optional[int] = None,
    rng: Optional[random.Random] = None,
    min_rate: Optional[float] = DEFAULT_MIN_RATE,
    rate_grace: float = DEFAULT_RATE_GRACE,
) -> Optional[Tuple[Any, List[torch.Tensor]]]:
    """Download the state of the best donor that delivers it whole: ``(metadata, tensors)``, or None.

    Donors are the averagers that declared a numeric priority under ``<prefix>.all_averagers``, highest first (ties
    at random), ourselves excluded. A donor whose download fails in any way is skipped (with a warning saying why)
    and the next one is tried; None means that nobody shares a state or that every donor failed within ``timeout``.

    :param p2p: the P2P to call donors with (the averager's)
    :param dht: the averager's DHT, for finding donors
    :param prefix: the averagers' prefix; donors are called at ``<prefix>::<servicer_type name>.rpc_download_state``
    :param servicer_type: the averager class whose handlers the donors serve (its name is part of the handler name)
    :param own_peer_id: our peer id, never used as a donor
    :param expected_tensors: what the state must look like (objects with ``.shape`` and ``.dtype``, e.g. our own
      state's tensors); donors whose tensors differ in number, shape or dtype are skipped. None: any shapes.
    :param timeout: seconds for the whole call (finding donors and all download attempts); None: no overall limit
    :param request_timeout: with ``timeout`` given and no ``next_chunk_timeout``, the limit between two messages
    :param next_chunk_timeout: the limit between two messages of a download (None: as above, or 60 s); the first
      message may take up to DONOR_PREPARATION_TIMEOUT (25 s) or this limit, whichever is longer
    :param max_bytes: refuse states with more tensor bytes (default: what ``expected_tensors`` allows, or 16 GiB)
    :param min_rate: a donor that sends fewer bytes per second that we wait on it (after ``rate_grace`` seconds
      and its first message) is abandoned for the next one (see :func:`download_state`; None: no floor)
    :param rate_grace: seconds of waiting on a donor allowed on top of what its pace earns
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    if next_chunk_timeout is not None:
        message_timeout = next_chunk_timeout
    else:
        message_timeout = request_timeout if timeout is not None else DEFAULT_STALL_TIMEOUT
    # before its first message a donor may queue the download and copy its state: allow that, within ``timeout``
    first_message_timeout = max(message_timeout, DONOR_PREPARATION_TIMEOUT)
    key = f"{prefix}.all_averagers"
    lookup_timeout = DHT_LOOKUP_TIMEOUT if deadline is None else max(deadline - time.monotonic(), 0.0)
    try:
        entries = await await_with_timeout(dht.get(key, latest=True, return_future=True), lookup_timeout)
    except asyncio.TimeoutError:
        logger.warning(f"Could not look up state donors under {key} within {lookup_timeout:.1f} s")
        return None
    donors = order_donors(entries, own_peer_id, rng)
    if not donors:
        logger.info(f"Nobody shares a state under {key}")
        return None
    for attempt, (donor, priority) in enumerate(_until(deadline, donors)):
        logger.info(f"Downloading the state from {donor} (priority {priority}, donor {attempt + 1} of {len(donors)})")
        started = time.perf_counter()
        try:
            metadata, tensors = await download_state(
                p2p,
                donor,
                prefix=prefix,
                servicer_type=servicer_type,
                expected_tensors=expected_tensors,
                max_bytes=max_bytes,
                message_timeout=message_timeout,
                deadline=deadline,
                first_message_timeout=first_message_timeout,
                min_rate=min_rate,
                rate_grace=rate_grace,
            )
        except asyncio.CancelledError:
            raise
        except Exception as e:
            logger.warning(f"State download from {donor} failed, trying the next donor: {type(e).__name__}: {e}")
            continue
        num_bytes = sum(tensor.numel() * tensor.element_size() for tensor in tensors)
        logger.info(
            f"Downloaded the state from {donor}: {len(tensors)} tensors, {num_bytes} bytes "
            f"in {time.perf_counter() - started:.2f} s"
        )
        return metadata, tensors
    logger.warning(f"Could not download a state from any of the {len(donors)} donors under {key}")
    return None


def _until(deadline: Optional[float], items: Iterable) -> Iterable:
    """Yield ``items`` while ``deadline`` (time.monotonic) has not passed."""
    for item in items:
        if deadline is not None and time.monotonic() >= deadline:
            logger.warning("The time for loading the state ran out before every donor was tried")
            return
        yield item
