"""The donor side of state sharing: announce in the DHT that this averager shares its state, and stream it out.

An averager that shares its state declares ``<prefix>.all_averagers[<own peer id>] = priority`` in the DHT and serves
``rpc_download_state``: the metadata (msgpack) and every tensor, compressed with ``state_compression`` and cut in
64 KiB chunks. A donor serves at most ``max_concurrent_downloads`` downloads at once; up to ``max_queued_downloads``
more wait for a free slot (first come, first served) for at most ``max_queue_wait`` seconds, and any others are refused
at once with :class:`DonorBusyError`, so that the newcomer tries another donor instead of piling onto this one.
A downloader that takes no chunk for ``send_stall_timeout`` seconds, or reads slower than a floor on its pace
(:mod:`hivemind.averaging.state_rate`), is dropped and its slot freed, with a warning naming it.
Downloads that overlap stream one snapshot of the state (:mod:`hivemind.averaging.state_snapshot`), so a donor holds
at most ``max_snapshots`` copies of its state however many peers download it.
The receiving side lives in :mod:`hivemind.averaging.state_download`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import threading
import time
from typing import Any, AsyncIterator, Awaitable, Callable, Iterator, List, Optional, Sequence, Tuple

import torch

from hivemind.averaging.state_rate import DEFAULT_MIN_RATE, DEFAULT_RATE_GRACE, RateFloor
from hivemind.averaging.state_snapshot import (
    DONOR_BUSY_HINT,
    SNAPSHOT_AGE_CAP,
    SNAPSHOT_BURST,
    DonorBusyError,
    SnapshotCache,
)
from hivemind.compression import (
    CompressionBase,
    CompressionInfo,
    Float16Compression,
    NoCompression,
    ScaledFloat16Compression,
)
from hivemind.compression.adaptive import AdaptiveCompressionBase
from hivemind.dht import DHT
from hivemind.p2p import P2PContext, PeerID
from hivemind.proto import averaging_pb2, runtime_pb2
from hivemind.utils.asyncio import await_with_timeout, cancel_and_wait
from hivemind.utils.logging import get_logger
from hivemind.utils.serializer import MSGPackSerializer
from hivemind.utils.streaming import STREAMING_CHUNK_SIZE_BYTES, split_for_streaming
from hivemind.utils.timed_storage import get_dht_time

__all__ = [
    "StateSharing",
    "DownloadSlots",
    "DonorBusyError",
    "CurrentState",
    "all_averagers_key",
    "DEFAULT_MAX_CONCURRENT_DOWNLOADS",
    "DEFAULT_MAX_QUEUED_DOWNLOADS",
    "DEFAULT_MAX_QUEUE_WAIT",
    "DEFAULT_SEND_STALL_TIMEOUT",
]

logger = get_logger(__name__)

# (metadata, tensors, infos): what get_current_state returns; infos may be None (then each tensor gets a default)
CurrentState = Tuple[Any, Sequence[torch.Tensor], Optional[Sequence[CompressionInfo]]]

DEFAULT_MAX_CONCURRENT_DOWNLOADS = 4  # downloads streamed at the same time by one donor
DEFAULT_MAX_QUEUED_DOWNLOADS = 16  # further downloads that may wait for a free slot; beyond that: refused at once
DEFAULT_MAX_QUEUE_WAIT = 10.0  # seconds a queued download waits for a slot before it is refused
DEFAULT_SEND_STALL_TIMEOUT = 60.0  # a downloader that takes no chunk for this long is dropped (its slot freed)
DEFAULT_GET_STATE_TIMEOUT = 300.0  # seconds for get_current_state (e.g. a round trip to the user's process)
DEFAULT_SNAPSHOT_MAX_AGE = 10.0  # seconds for which downloads that overlap share one snapshot of the state
DEFAULT_MAX_SNAPSHOTS = 2  # snapshots of the state (copies) streamed at once at most
RETRACT_TIMEOUT = 5.0  # seconds spent at shutdown on withdrawing the declaration
MESSAGES_PER_BATCH = 64  # chunk messages built per trip to the thread pool (4 MiB of tensor data)
_UNCOMPRESSED = NoCompression()  # for tensors that state_compression cannot encode (e.g. integers with float16)
# codecs that encode every element on its own (exact types: ScaledFloat16Compression keeps per-tensor statistics)
ELEMENTWISE_CODECS = (NoCompression, Float16Compression)


def all_averagers_key(prefix: str) -> str:
    """The DHT key under which averagers with prefix ``prefix`` declare their state-sharing priority."""
    return f"{prefix}.all_averagers"


class DownloadSlots:
    """At most ``max_active`` holders at once; up to ``max_waiting`` more wait in turn for at most ``max_wait`` s;
    one holder or waiter per ``who`` (a peer).

    ``async with slots.acquire(who):`` either enters, or raises :class:`DonorBusyError` when the queue is full or the
    wait ran out. Cancelling a waiter (its downloader left) takes it out of the queue.
    """

    def __init__(self, max_active: int, max_waiting: int, max_wait: Optional[float]):
        if max_active < 1 or max_waiting < 0:
            raise ValueError(f"need max_active >= 1 and max_waiting >= 0, got {max_active} and {max_waiting}")
        self.max_active, self.max_waiting, self.max_wait = max_active, max_waiting, max_wait
        self._semaphore = asyncio.Semaphore(max_active)
        self.active = 0  # holders right now
        self.waiting = 0  # callers queued for a slot right now
        self._peers = set()  # the ``who`` of every holder and waiter: one download per peer at a time

    @contextlib.asynccontextmanager
    async def acquire(self, who: object = None) -> AsyncIterator[None]:
        if who is not None and who in self._peers:  # else one peer opening many downloads locks the others out
            raise DonorBusyError(f"{who} already downloads this peer's state (or waits for it): {DONOR_BUSY_HINT}")
        if who is not None:
            self._peers.add(who)
        try:
            async with self._acquire_slot():
                yield
        finally:
            self._peers.discard(who)

    @contextlib.asynccontextmanager
    async def _acquire_slot(self) -> AsyncIterator[None]:
        if self._semaphore.locked() or self.waiting > 0:  # no free slot, or others are first in line
            if self.waiting >= self.max_waiting:
                raise DonorBusyError(
                    f"this peer already streams its state to {self.active} peers and {self.waiting} more are queued "
                    f"(limits: {self.max_active} at once, {self.max_waiting} queued); {DONOR_BUSY_HINT}"
                )
            self.waiting += 1
            try:
                await await_with_timeout(self._semaphore.acquire(), self.max_wait)
            except asyncio.TimeoutError:
                raise DonorBusyError(
                    f"no free download slot within {self.max_wait} s ({self.active} downloads in progress); "
                    f"{DONOR_BUSY_HINT}"
                ) from None
            finally:
                self.waiting -= 1
        else:
            await self._semaphore.acquire()
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1
            self._semaphore.release()


class StateSharing:
    """Owned by an averager (runs in the averager's process and event loop): declares and serves its state.

    :param dht: the averager's DHT (its calls cross into the DHT process)
    :param peer_id: this averager's peer id (the subkey it declares under)
    :param prefix: the averager's prefix; the declaration goes to ``<prefix>.all_averagers``
    :param get_current_state: ``async () -> (metadata, tensors, infos)`` giving the state to send. Runs when a
      download got a slot and no snapshot can be reused (see :class:`SnapshotCache`); downloads that overlap share
      one result. The tensors must not change while they are sent (return copies or tensors nobody writes to);
      ``infos`` may be None. The averager makes it call ``get_current_state`` in the user's process.
    :param state_compression: compression for the streamed tensors (CompressionBase, may be adaptive)
    :param allow_state_sharing: serve downloads and declare the priority (client-mode averagers cannot)
    :param state_sharing_priority: donors with a higher priority are chosen first (a finite number)
    :param declare_state_period: seconds between declarations; each declaration expires after that long
    :param client_mode: whether the averager accepts no incoming connections (then sharing cannot be enabled)
    :param max_concurrent_downloads: downloads streamed at once
    :param max_queued_downloads: downloads that may wait for a slot; more are refused with DonorBusyError
    :param max_queue_wait: seconds a queued download waits for a slot before it is refused
    :param send_stall_timeout: a downloader that takes no message for this many seconds is dropped
    :param min_send_rate: a downloader that the donor waited on for longer than ``send_rate_grace`` plus one second
      per ``min_send_rate`` bytes it took is dropped (None: no floor); see :mod:`hivemind.averaging.state_rate`
    :param send_rate_grace: seconds of waiting on a downloader allowed on top of what its pace earns
    :param get_state_timeout: seconds allowed for ``get_current_state``
    :param snapshot_max_age: seconds for which a snapshot that other downloads stream is reused by a new download
    :param max_snapshots: snapshots streamed at once at most (each one a copy of the state)
    :param snapshot_burst: seconds of snapshot time that may be spent back to back before snapshots are spaced out
    :param snapshot_age_cap: seconds: an older snapshot is never sent; a download that would get one is refused
    """

    def __init__(
        self,
        *,
        dht: DHT,
        peer_id: PeerID,
        prefix: str,
        get_current_state: Callable[[], Awaitable[CurrentState]],
        state_compression: CompressionBase = NoCompression(),
        allow_state_sharing: bool = True,
        state_sharing_priority: float = 0.0,
        declare_state_period: float = 30.0,
        client_mode: bool = False,
        max_concurrent_downloads: int = DEFAULT_MAX_CONCURRENT_DOWNLOADS,
        max_queued_downloads: int = DEFAULT_MAX_QUEUED_DOWNLOADS,
        max_queue_wait: Optional[float] = DEFAULT_MAX_QUEUE_WAIT,
        send_stall_timeout: Optional[float] = DEFAULT_SEND_STALL_TIMEOUT,
        min_send_rate: Optional[float] = DEFAULT_MIN_RATE,
        send_rate_grace: float = DEFAULT_RATE_GRACE,
        get_state_timeout: Optional[float] = DEFAULT_GET_STATE_TIMEOUT,
        snapshot_max_age: float = DEFAULT_SNAPSHOT_MAX_AGE,
        max_snapshots: int = DEFAULT_MAX_SNAPSHOTS,
        snapshot_age_cap: float = SNAPSHOT_AGE_CAP,
        snapshot_burst: float = SNAPSHOT_BURST,
    ):
        if not (isinstance(declare_state_period, (int, float)) and declare_state_period > 0):
            raise ValueError(f"declare_state_period must be a positive number of seconds, got {declare_state_period}")
        self.dht, self.peer_id, self.prefix, self.client_mode = dht, peer_id, prefix, client_mode
        self.get_current_state, self.state_compression = get_current_state, state_compression
        self.declare_state_period = float(declare_state_period)
        self.send_stall_timeout, self.get_state_timeout = send_stall_timeout, get_state_timeout
        RateFloor(min_send_rate, send_rate_grace)  # validates both
        self.min_send_rate, self.send_rate_grace = min_send_rate, float(send_rate_grace)
        self.slots = DownloadSlots(max_concurrent_downloads, max_queued_downloads, max_queue_wait)
        self.snapshots = SnapshotCache(
            get_current_state,
            snapshot_max_age,
            max_snapshots,
            get_state_timeout,
            age_cap=snapshot_age_cap,
            burst=snapshot_burst,
        )
        self._allow_state_sharing = False
        self._priority = 0.0
        self.allow_state_sharing = allow_state_sharing  # validated by the setters
        self.state_sharing_priority = state_sharing_priority
        self._declared_sharing = False  # whether the DHT may hold a numeric declaration of ours
        self._changed = threading.Event()  # set from any thread; the declare loop polls it through _wakeup
        self._wakeup: Optional[asyncio.Event] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._declare_task: Optional[asyncio.Task] = None

    @property
    def key(self) -> str:
        return all_averagers_key(self.prefix)

    @property
    def allow_state_sharing(self) -> bool:
        return self._allow_state_sharing

    @allow_state_sharing.setter
    def allow_state_sharing(self, value: bool) -> None:
        if value and self.client_mode:
            raise ValueError(
                "a client-mode averager accepts no incoming connections, so it cannot share its state: "
                "leave allow_state_sharing False (or run the averager's DHT without client_mode)"
            )
        self._allow_state_sharing = bool(value)
        self._notify_change()

    @property
    def state_sharing_priority(self) -> float:
        return self._priority

    @state_sharing_priority.setter
    def state_sharing_priority(self, value: float) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"state_sharing_priority must be a finite number, got {value!r}")
        if value != 0 and self.client_mode:
            raise ValueError("a client-mode averager cannot share its state, so it cannot have a non-zero priority")
        self._priority = float(value)
        self._notify_change()

    def _notify_change(self) -> None:
        """Re-declare soon; safe to call from any thread."""
        changed = getattr(self, "_changed", None)
        if changed is None:
            return  # still in __init__
        changed.set()
        if self._loop is not None and self._wakeup is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._wakeup.set)

    # ------------------------------------------------------------------ declarations

    async def start(self) -> None:
        """Start declaring in the background (call once, inside the averager's running event loop)."""
        if self._declare_task is not None:
            raise RuntimeError("StateSharing.start() was already called")
        self._loop, self._wakeup = asyncio.get_running_loop(), asyncio.Event()
        self._wakeup.set()  # declare right away
        self._declare_task = asyncio.create_task(self._declare_periodically(), name=f"declare {self.key}")

    async def shutdown(self) -> None:
        """Stop declaring; if the DHT may hold our priority, replace it with None (bounded by RETRACT_TIMEOUT)."""
        await self.snapshots.shutdown()
        if self._declare_task is not None:
            await cancel_and_wait(self._declare_task)
            self._declare_task = None
        if self._declared_sharing:
            try:
                await await_with_timeout(self._declare(None), RETRACT_TIMEOUT)
            except Exception as e:
                logger.debug(f"Could not withdraw the state-sharing declaration under {self.key}: {e!r}")

    async def _declare_periodically(self) -> None:
        while True:
            self._wakeup.clear()
            self._changed.clear()
            try:
                await await_with_timeout(self.declare(), self.declare_state_period)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                logger.warning(f"Could not declare the state-sharing priority under {self.key}: {e!r}")
            if self._changed.is_set():
                continue  # changed while we were storing
            try:
                await await_with_timeout(self._wakeup.wait(), self.declare_state_period)
            except asyncio.TimeoutError:
                pass

    async def declare(self) -> bool:
        """Store the current priority (or None if sharing is off) once; returns whether the DHT accepted it.

        A peer that never shared declares nothing (returns False).
        """
        value = self._priority if self._allow_state_sharing else None
        if value is None and not self._declared_sharing:
            return False
        return await self._declare(value)

    async def _declare(self, value: Optional[float]) -> bool:
        if value is not None:
            self._declared_sharing = True
        stored = await self.dht.store(
            key=self.key,
            subkey=self.peer_id.to_bytes(),
            value=value,
            expiration_time=get_dht_time() + self.declare_state_period,
            return_future=True,
        )
        if value is None and stored:
            self._declared_sharing = False
        logger.debug(f"Declared state-sharing priority {value} under {self.key} (stored: {stored})")
        return stored

    # ------------------------------------------------------------------ serving downloads

    async def rpc_download_state(
        self, _request: averaging_pb2.DownloadRequest, context: P2PContext
    ) -> AsyncIterator[averaging_pb2.DownloadData]:
        """Stream this averager's state: metadata in the first message, then every tensor in 64 KiB chunks.

        A peer that does not share its state ends the stream at once with no messages.
        """
        if not self._allow_state_sharing:
            logger.debug(f"Refused a state download by {context.remote_id}: state sharing is off")
            return
        async with self.slots.acquire(context.remote_id):
            if not self._allow_state_sharing:  # switched off while the caller was queued
                return
            messages = self._state_messages(context)
            watched = _with_reader_watchdog(
                messages, self.send_stall_timeout, self.min_send_rate, self.send_rate_grace, context
            )
            async for message in watched:
                yield message

    async def _state_messages(self, context: P2PContext) -> AsyncIterator[averaging_pb2.DownloadData]:
        started = time.perf_counter()
        async with self.snapshots.use() as snapshot:
            got_state = time.perf_counter()
            serialized_metadata = MSGPackSerializer.dumps(snapshot.metadata)
            loop = asyncio.get_running_loop()
            sent_bytes = 0
            for tensor, info in zip(snapshot.tensors, snapshot.infos):
                # encoding and cutting into messages is CPU work: done in a thread, a batch of chunks at a time
                chunks = await loop.run_in_executor(None, self._compressed_chunks, tensor, info)
                while batch := await loop.run_in_executor(None, _next_messages, chunks):
                    for message in batch:
                        if serialized_metadata is not None:
                            message.metadata, serialized_metadata = serialized_metadata, None
                        sent_bytes += len(message.tensor_part.buffer)
                        yield message
            if serialized_metadata is not None:  # a state without tensors: metadata only
                yield averaging_pb2.DownloadData(metadata=serialized_metadata)
            logger.info(
                f"Sent our state to {context.remote_id}: {len(snapshot.tensors)} tensors, {sent_bytes} bytes in "
                f"{time.perf_counter() - got_state:.2f} s (+ {got_state - started:.2f} s to get the state, "
                f"taken {snapshot.age:.1f} s ago, streamed to {snapshot.users} peers now)"
            )

    def _compressed_chunks(self, tensor: torch.Tensor, info: CompressionInfo) -> Iterator[runtime_pb2.Tensor]:
        tensor = tensor.detach().cpu()
        codec = self.state_compression
        while isinstance(codec, AdaptiveCompressionBase):
            codec = codec.choose_compression(info)
        if tensor.ndim == 0 and isinstance(codec, ScaledFloat16Compression):
            codec = _UNCOMPRESSED  # (hivemind 1.1.12 cannot decode a 0-d MEANSTD_16BIT tensor: 10 bytes for 4 anyway)
        if type(codec) in ELEMENTWISE_CODECS and tensor.numel() > 0:
            try:
                return _chunks_slice_by_slice(tensor, codec, info)
            except (ValueError, TypeError, AssertionError) as e:  # e.g. a float16 codec given an integer tensor
                logger.debug(f"Sending state tensor {info.key} ({tensor.dtype}) uncompressed: {e}")
                return _chunks_slice_by_slice(tensor, _UNCOMPRESSED, info)
        return split_for_streaming(self._compress(tensor, info, codec), STREAMING_CHUNK_SIZE_BYTES)

    def _compress(self, tensor: torch.Tensor, info: CompressionInfo, codec: Optional[CompressionBase] = None):
        codec = self.state_compression if codec is None else codec
        try:
            return codec.compress(tensor, info, allow_inplace=False)
        except (ValueError, TypeError, AssertionError) as e:  # e.g. a float16 codec given an integer tensor
            logger.debug(f"Sending state tensor {info.key} ({tensor.dtype}) uncompressed: {e}")
            return _UNCOMPRESSED.compress(tensor, info, allow_inplace=False)


def _chunks_slice_by_slice(
    tensor: torch.Tensor, codec: CompressionBase, info: CompressionInfo
) -> Iterator[runtime_pb2.Tensor]:
    """The chunks that ``split_for_streaming(codec.compress(tensor))`` gives, for a codec that encodes each element
    on its own (so the encoding of a slice is that slice of the encoding), made one 64 KiB slice at a time: no
    download holds an encoded copy of a whole tensor. Raises at once if the codec refuses the tensor."""
    flat = tensor.reshape(-1)  # a view when contiguous (state snapshots are)
    probe = codec.compress(flat[:1], info, allow_inplace=False)
    wire_itemsize = len(probe.buffer)
    if wire_itemsize == 0 or STREAMING_CHUNK_SIZE_BYTES % wire_itemsize:
        raise ValueError(f"{type(codec).__name__} encodes a {tensor.dtype} element in {wire_itemsize} bytes")
    per_chunk = STREAMING_CHUNK_SIZE_BYTES // wire_itemsize
    num_chunks = -(-flat.numel() // per_chunk)

    def chunks() -> Iterator[runtime_pb2.Tensor]:
        for start in range(0, flat.numel(), per_chunk):
            piece = codec.compress(flat[start : start + per_chunk], info, allow_inplace=False)
            if start == 0:  # the head chunk describes the whole tensor
                del piece.size[:]
                piece.size.extend(tensor.shape)
                piece.chunks = num_chunks
                yield piece
            else:
                yield runtime_pb2.Tensor(buffer=piece.buffer)

    return chunks()


def _next_messages(chunks: Iterator[runtime_pb2.Tensor]) -> List[averaging_pb2.DownloadData]:
    """The next few chunks as DownloadData messages ([] when there are no more)."""
    return [averaging_pb2.DownloadData(tensor_part=chunk) for chunk in itertools.islice(chunks, MESSAGES_PER_BATCH)]


async def _with_reader_watchdog(
    messages: AsyncIterator[averaging_pb2.DownloadData],
    stall_timeout: Optional[float],
    min_rate: Optional[float],
    rate_grace: float,
    context: P2PContext,
) -> AsyncIterator[averaging_pb2.DownloadData]:
    """Re-yield ``messages``; cancel the task that serves this stream (freeing its download slot) when the downloader
    does not come back for the next message within about ``stall_timeout`` seconds, or when we waited on it for longer
    than ``rate_grace`` plus one second per ``min_rate`` bytes it took (see :mod:`hivemind.averaging.state_rate`): a
    reader that takes one chunk just before every stall timeout would otherwise hold its slot for hours.

    The handler's task is the one that iterates this generator and writes each message to the stream, so cancelling
    it ends the stream and releases the download slot; the caller receives an error frame. One timer per download
    checks progress four times per limit (a timer per message would cost more than the message).
    """
    if stall_timeout is None and min_rate is None:
        async for message in messages:
            yield message
        return
    task, loop = asyncio.current_task(), asyncio.get_running_loop()
    floor = RateFloor(min_rate, rate_grace)
    limits = [limit for limit in (stall_timeout, rate_grace if min_rate is not None else None) if limit is not None]
    period = max(min(limits) / 4, 0.01)
    waiting_since: Optional[float] = None  # loop.time() when the last message went out, while it is being sent
    timer: Optional[asyncio.TimerHandle] = None

    def drop(reason: str) -> None:
        logger.warning(f"Dropped the state download of {context.remote_id} to free its slot: {reason}")
        task.cancel()

    def check() -> None:
        nonlocal timer
        now = loop.time()
        if stall_timeout is not None and waiting_since is not None and now - waiting_since >= stall_timeout:
            return drop(f"it took no state chunk for {stall_timeout} s")
        too_slow = floor.check(now)
        if too_slow is not None:
            return drop(f"it reads too slowly: {too_slow}")
        timer = loop.call_later(period, check)

    try:
        check()
        async for message in messages:
            waiting_since = loop.time()
            floor.wait_started(waiting_since)
            yield message
            floor.wait_ended(loop.time(), message.ByteSize())
            waiting_since = None
    finally:
        if timer is not None:
            timer.cancel()
        await messages.aclose()
