"""The receiving side of state sharing: choose donors from the DHT and download a complete state from one of them.

The protocol sends no tensor count: the stream just ends after the last chunk, and a donor that dies between two
tensors looks the same as one that finished. So a download is accepted only when it is provably whole: every
tensor got exactly the number of chunks its first chunk announced and decodes to its announced shape, and, when
the caller knows what the state should look like (``expected_tensors``, e.g. the averager's own state), the tensors
match it in number, shape and dtype. Anything else (a broken or stalled stream, garbage metadata, a wrong shape)
rejects that donor and the next one is tried; a partial state is never returned. So does a donor that sends slower
than a floor on its pace (:mod:`hivemind.averaging.state_rate`), and one whose message exceeds MAX_MESSAGE_BYTES.
The checks themselves are :class:`~hivemind.averaging.state_assembly.StateAssembler`'s. A donor that has not started
sending within ``request_timeout`` gets a competitor: the next donor is asked too and the first to start is kept
(:mod:`hivemind.averaging.state_hedge`), so silent donors of the highest priority cannot hold a newcomer for long.

The tensors of a downloaded state are views of one shared-memory buffer (written in place as they are decoded when
the expected shapes and dtypes are known): they reach the user's process as one file descriptor, not one per tensor.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from typing import Any, AsyncIterator, Collection, List, Optional, Sequence, Tuple, Type

import torch

from hivemind.averaging.state_assembly import (
    DEFAULT_MAX_UNCHECKED_STATE_BYTES,
    StateAssembler,
    StateDownloadError,
    decode_chunks,
)
from hivemind.averaging.state_hedge import first_to_start
from hivemind.averaging.state_rate import DEFAULT_MIN_RATE, DEFAULT_RATE_GRACE, RateFloor
from hivemind.averaging.state_snapshot import DONOR_BUSY_HINT, empty_packed, packed_copy
from hivemind.dht import DHT
from hivemind.p2p import P2P, P2PHandlerError, PeerID
from hivemind.p2p.servicer import ServicerBase, get_handle_name
from hivemind.proto import averaging_pb2, runtime_pb2
from hivemind.utils.asyncio import await_with_timeout
from hivemind.utils.logging import get_logger

__all__ = [
    "load_state_from_peers",
    "order_donors",
    "StateAssembler",
    "StateDownloadError",
    "decode_chunks",
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
MAX_PEER_ID_BYTES = 128
# a donor's message is a 64 KiB chunk, and the first one the state's metadata besides: a larger message is refused
# before it is read (an optimizer's metadata takes about a hundred bytes per tensor of its state)
MAX_MESSAGE_BYTES = 32 * 2**20
# donors that refuse a download only because they already serve as many as they allow are asked again after a pause
# (0.5 s, doubling up to 4 s, with jitter) until the caller's timeout, or for this long without one
BUSY_RETRY_WINDOW = 600.0
BUSY_RETRY_FIRST_PAUSE, BUSY_RETRY_MAX_PAUSE = 0.5, 4.0
# for this long after a donor answered busy, donors whose priority is more than BUSY_PRIORITY_SLACK below its own
# (an optimizer's: more than an epoch behind) are not asked: its state is waited for, not an older one taken at once
BUSY_PREFER_WINDOW, BUSY_PRIORITY_SLACK = 10.0, 1.0


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
    assembler.check_cast(index, tensor, out)  # (a donor in another precision)
    return out


class _DonorDownload:
    """One donor's download in two steps: :meth:`start` opens the stream and takes the first message (which the donor
    sends only once it had a free slot and a snapshot of its state), :meth:`finish` takes and checks the rest. Each
    closes the stream when it fails; :meth:`aclose` closes it at any time. The shared buffer for the tensors is
    allocated only once the donor started, so downloads that are merely asked (:mod:`state_hedge`) cost nothing."""

    def __init__(
        self,
        p2p: P2P,
        donor: PeerID,
        *,
        prefix: str,
        servicer_type: Type[ServicerBase],
        expected_tensors: Optional[Sequence[Any]],
        max_bytes: Optional[int],
        optional_tail: int = 0,
        message_timeout: Optional[float],
        deadline: Optional[float],
        first_message_timeout: Optional[float],
        min_rate: Optional[float],
        rate_grace: float,
    ):
        RateFloor(min_rate, rate_grace)  # validates both
        self.p2p, self.donor, self.deadline = p2p, donor, deadline
        self.handler = get_handle_name(prefix, servicer_type.__name__, "rpc_download_state")
        self.message_timeout = message_timeout
        self.first_message_timeout = message_timeout if first_message_timeout is None else first_message_timeout
        self.min_rate, self.rate_grace = min_rate, rate_grace
        self.assembler = StateAssembler(expected_tensors, max_bytes, optional_tail)
        self.asked_at = time.perf_counter()
        self._stream: Optional[AsyncIterator[averaging_pb2.DownloadData]] = None
        self._floor: Optional[RateFloor] = None  # how fast the donor sends (from its first message on)

    async def _next_message(self, limit: Optional[float]) -> Optional[averaging_pb2.DownloadData]:
        """The donor's next message within ``limit`` seconds and the deadline; None when the stream ended."""
        timeout = limit
        if self.deadline is not None:
            remaining = max(self.deadline - time.monotonic(), 0.0)
            timeout = remaining if timeout is None else min(timeout, remaining)
        try:
            return await await_with_timeout(self._stream.__anext__(), timeout)
        except StopAsyncIteration:
            return None
        except asyncio.TimeoutError:
            raise asyncio.TimeoutError(
                f"no message from the donor for {timeout:.1f} s after {self.assembler.num_messages} messages"
            ) from None

    async def start(self) -> None:
        """Open the stream and take the donor's first message; raises (and closes the stream) on failure."""
        self._stream = await self.p2p.iterate_protobuf_handler(
            self.donor,
            self.handler,
            averaging_pb2.DownloadRequest(),
            averaging_pb2.DownloadData,
            max_message_size=MAX_MESSAGE_BYTES,
        )
        try:
            message = await self._next_message(self.first_message_timeout)
            if message is None:
                self.assembler.finish()  # raises: the donor sent nothing
            # the floor starts after the first message, which the donor may prepare for long
            self._floor = RateFloor(self.min_rate, self.rate_grace)
            self.assembler.add(message)  # the first message finishes no tensor
        except BaseException:
            await self.aclose()
            raise

    async def finish(self) -> Tuple[Any, List[torch.Tensor]]:
        """After :meth:`start`: take the rest of the state and check it; closes the stream in any case."""
        assembler, floor = self.assembler, self._floor
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

        try:
            while True:
                floor.wait_started(time.monotonic())
                message = await self._next_message(self.message_timeout)
                if message is None:
                    break
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
            await self.aclose()
            if decoding is not None:  # failed part-way: let the thread finish, drop its result
                await asyncio.gather(decoding, return_exceptions=True)
        if outputs is None or len(tensors) < len(outputs):  # one shared buffer for the whole state all the same (one
            tensors = await loop.run_in_executor(None, packed_copy, tensors)  # copy; none of the optional tail's room)
        return assembler.metadata, tensors

    async def aclose(self) -> None:
        """Close the stream (the donor's handler is cancelled and frees its slot or queue place); idempotent."""
        stream, self._stream = self._stream, None
        if stream is not None:
            await stream.aclose()


async def load_state_from_peers(
    *,
    p2p: P2P,
    dht: DHT,
    prefix: str,
    servicer_type: Type[ServicerBase],
    own_peer_id: Optional[PeerID] = None,
    expected_tensors: Optional[Sequence[Any]] = None,
    optional_tail: int = 0,
    timeout: Optional[float] = None,
    request_timeout: float = 3.0,
    next_chunk_timeout: Optional[float] = None,
    max_bytes: Optional[int] = None,
    rng: Optional[random.Random] = None,
    min_rate: Optional[float] = DEFAULT_MIN_RATE,
    rate_grace: float = DEFAULT_RATE_GRACE,
    exclude: Collection[PeerID] = (),
    with_donor: bool = False,
) -> Optional[Tuple[Any, ...]]:
    """Download the state of the best donor that delivers it whole: ``(metadata, tensors)``, or None.

    Donors are the averagers that declared a numeric priority under ``<prefix>.all_averagers``, highest first (ties
    at random), ourselves excluded. A donor whose download fails in any way is skipped (with a warning saying why)
    and the next one is tried; None means that nobody shares a state or that every donor failed within ``timeout``.
    Donors that have not started sending within ``request_timeout`` do not hold up the next ones: those are asked
    too, one per ``request_timeout``, and the first whose state starts arriving is downloaded from.

    :param p2p: the P2P to call donors with (the averager's)
    :param dht: the averager's DHT, for finding donors
    :param prefix: the averagers' prefix; donors are called at ``<prefix>::<servicer_type name>.rpc_download_state``
    :param servicer_type: the averager class whose handlers the donors serve (its name is part of the handler name)
    :param own_peer_id: our peer id, never used as a donor
    :param expected_tensors: what the state must look like (objects with ``.shape`` and ``.dtype``, e.g. our own
      state's tensors); donors whose tensors differ in number, shape or dtype are skipped. None: any shapes.
    :param optional_tail: the last this many expected tensors may be missing altogether (a training state without
      optimizer statistics): a state of exactly the ones before them is accepted too, in the same download
    :param timeout: seconds for the whole call (finding donors and all download attempts); None: no overall limit
    :param request_timeout: seconds that the donors asked so far may take to start sending before the next one is
      asked too (the first to start is kept, unless a better one asked before is still preparing; see
      :mod:`hivemind.averaging.state_hedge`); and, with ``timeout`` given
      and no ``next_chunk_timeout``, the limit between two messages
    :param next_chunk_timeout: the limit between two messages of a download (None: as above, or 60 s); the first
      message may take up to DONOR_PREPARATION_TIMEOUT (25 s) or this limit, whichever is longer
    :param max_bytes: refuse states with more tensor bytes (default: what ``expected_tensors`` allows, or 16 GiB)
    :param min_rate: a donor that sends fewer bytes per second that we wait on it (after ``rate_grace`` seconds
      and its first message) is abandoned for the next one (None: no floor; see :mod:`hivemind.averaging.state_rate`):
      one that sends a chunk just before every message limit would otherwise hold a newcomer without an overall
      ``timeout`` for hours. Checked as each message arrives; a single wait is bounded by the message limit
    :param rate_grace: seconds of waiting on a donor allowed on top of what its pace earns
    :param exclude: donors not to ask (e.g. those whose state the caller refused after an earlier download)
    :param with_donor: return ``(metadata, tensors, donor)``, saying whose state it is
    """
    if _daemon_stopped(p2p):  # no donor can be reached: say why once, not once per donor blaming each
        return None
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
    donors = [entry for entry in order_donors(entries, own_peer_id, rng) if entry[0] not in exclude]
    if not donors:
        left_out = f" besides the {len(exclude)} whose state was refused" if exclude else ""
        logger.info(f"Nobody shares a state under {key}{left_out}")
        return None
    rank = {donor: index + 1 for index, (donor, _) in enumerate(donors)}

    def ask(entry: Tuple[PeerID, float]) -> _DonorDownload:
        donor, priority = entry
        logger.info(f"Downloading the state from {donor} (priority {priority}, donor {rank[donor]} of {len(donors)})")
        return _DonorDownload(
            p2p,
            donor,
            prefix=prefix,
            servicer_type=servicer_type,
            expected_tensors=expected_tensors,
            max_bytes=max_bytes,
            optional_tail=optional_tail,
            message_timeout=message_timeout,
            deadline=deadline,
            first_message_timeout=first_message_timeout,
            min_rate=min_rate,
            rate_grace=rate_grace,
        )

    busy: List[PeerID] = []  # donors that refused only because they serve as many downloads as they allow
    busy_priority = [-math.inf]  # the best priority of a donor that answered busy

    def failed(entry: Tuple[PeerID, float], e: BaseException) -> None:
        if not p2p.is_alive:  # our own daemon, not the donor: said once below
            logger.debug(f"State download from {entry[0]} failed, this peer's p2pd is gone: {type(e).__name__}: {e}")
        elif isinstance(e, P2PHandlerError) and DONOR_BUSY_HINT in str(e):
            busy.append(entry[0])
            busy_priority[0] = max(busy_priority[0], entry[1])
            logger.info(f"Donor {entry[0]} is busy serving others, trying the next one (and it again later): {e}")
        else:
            logger.warning(f"State download from {entry[0]} failed, trying the next donor: {type(e).__name__}: {e}")

    # a donor that has not started within request_timeout (the wait for any peer's answer) gets a competitor
    hedge_delay = min(request_timeout, first_message_timeout)
    # a busy donor is a donor still: it is asked again after a pause, within the timeout (or BUSY_RETRY_WINDOW)
    retry_until = deadline if deadline is not None else time.monotonic() + BUSY_RETRY_WINDOW
    candidates, deferred, pauses = list(donors), [], 0
    # (at most half the call's time: the donors deferred meanwhile must have time to send their state)
    prefer_until = time.monotonic() + min(BUSY_PREFER_WINDOW, (retry_until - time.monotonic()) / 2)

    def may_ask_now(entry: Tuple[PeerID, float]) -> bool:  # (not a donor far below one that answered busy, for now)
        return time.monotonic() >= prefer_until or entry[1] >= busy_priority[0] - BUSY_PRIORITY_SLACK

    def window_end() -> float:  # (from then on every donor may be asked)
        return prefer_until

    while candidates or deferred or _pause_for_busy_donors(busy, retry_until, pauses):
        if _daemon_stopped(p2p):
            return None
        if time.monotonic() < prefer_until:  # a better donor that is busy is asked again before worse ones are
            floor = busy_priority[0] - BUSY_PRIORITY_SLACK
            deferred += [entry for entry in candidates if entry[1] < floor]
            candidates = [entry for entry in candidates if entry[1] >= floor]
        if not candidates and _pause_for_busy_donors(busy, retry_until, pauses):
            # every donor asked failed or was busy, and there is time to ask the busy ones again
            candidates = [entry for entry in donors if entry[0] in busy]
            busy.clear()
            pauses += 1  # (not past the window while donors are deferred: they are asked when it ends)
            pause = _busy_pause(pauses) if not deferred else min(_busy_pause(pauses), prefer_until - time.monotonic())
            await asyncio.sleep(max(pause, 0.0))
            continue
        if deferred and (not candidates or time.monotonic() >= prefer_until):
            prefer_until = 0.0
        # (the deferred ones too, asked once the window ends: also while a donor asked before is slow to start)
        candidates, deferred = candidates + deferred, []  # (best first still)
        started = await first_to_start(
            candidates,
            ask,
            hedge_delay,
            deadline,
            failed,
            describe=lambda e: str(e[0]),
            priority=lambda e: e[1],  # a better donor that is only slow to start is waited for, within its own limit
            hold_limit=min(first_message_timeout, DONOR_PREPARATION_TIMEOUT),
            allowed=may_ask_now,
            allowed_from=window_end,
        )
        if started is None:
            if candidates and deadline is not None and time.monotonic() >= deadline:  # the time ran out
                break
            continue
        (donor, _), download = started
        try:
            metadata, tensors = await download.finish()
        except asyncio.CancelledError:
            raise
        except Exception as e:
            failed((donor, 0.0), e)
            if _daemon_stopped(p2p):
                return None
            continue
        finally:
            await download.aclose()
        num_bytes = sum(tensor.numel() * tensor.element_size() for tensor in tensors)
        logger.info(
            f"Downloaded the state from {donor}: {len(tensors)} tensors, {num_bytes} bytes "
            f"in {time.perf_counter() - download.asked_at:.2f} s"
        )
        return (metadata, tensors, donor) if with_donor else (metadata, tensors)
    if _daemon_stopped(p2p):  # it died while the last donors were asked (their failures were not theirs)
        return None
    if candidates:
        logger.warning(f"The time for loading the state ran out before {len(candidates)} donors were tried")
    still_busy = f" ({len(busy)} of them busy serving others until the time ran out)" if busy else ""
    logger.warning(f"Could not download a state from any of the {len(donors)} donors under {key}{still_busy}")
    return None


def _daemon_stopped(p2p: P2P) -> bool:
    """Whether this peer's p2pd is gone (then no donor can be reached); if so, logs a warning saying what to do."""
    if p2p.is_alive:
        return False
    try:
        p2p._raise_if_daemon_failed()
        reason = "the connection to it is lost"
    except Exception as e:
        reason = str(e)
    logger.warning(
        f"Cannot load the state from peers: the p2pd daemon of this peer's DHT stopped ({reason}), so no donor can be "
        "reached; shut down this averager and its DHT and create new ones"
    )
    return True


def _busy_pause(pauses: int) -> float:
    """Seconds to wait before asking busy donors again for the ``pauses``-th time (growing, with jitter)."""
    return min(BUSY_RETRY_FIRST_PAUSE * 2 ** (pauses - 1), BUSY_RETRY_MAX_PAUSE) * random.uniform(0.5, 1.0)


def _pause_for_busy_donors(busy: List[PeerID], retry_until: float, pauses: int) -> bool:
    """Whether busy donors are to be asked again: there are some, and the longest pause before it leaves time."""
    next_pause = min(BUSY_RETRY_FIRST_PAUSE * 2**pauses, BUSY_RETRY_MAX_PAUSE)
    return bool(busy) and time.monotonic() + next_pause < retry_until
