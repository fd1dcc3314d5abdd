"""How many bytes of request frames the stream handlers of one ``P2P`` hold at once, per remote peer and in all.

A frame's payload buffer grows only as its bytes arrive, but a peer chooses how many streams it opens and how much of
each frame it sends: frames that are started and left unfinished on many streams would each hold what arrived of them
for as long as the stall timeouts of ``framing`` allow, and complete requests wait in each stream's queue until its
handler takes them. ``InboundBudget`` counts the length that a frame's header announced from the moment it is
accepted until its request is taken by the handler (``protobuf_streams`` holds it with a ``FrameLease`` while the
request waits) or its stream ends; frames of at most ``UNCOUNTED_FRAME_BYTES`` (64 KiB) are not counted:

- **per peer first**: a new frame whose peer already holds frames (in flight or waiting for a handler) is refused if
  it would take that peer past ``per_peer_limit(max_message_size)``: at once if it would not fit even with the
  peer's requests that wait for their handlers (parked) left out, counting frames that wait for room like frames in
  flight; otherwise after waiting up to ``wait`` seconds, unread, for parked requests to be taken (several streams to
  busy handlers slow down instead of being refused, and what is received or waits stays within the share). A peer
  that holds nothing may always start one frame (up to the handler's ``max_message_size``), so no honest message is
  too large for the budget alone.
- **then in all**, only if ``total_bytes`` is given: a frame that fits its peer's share but not the total waits up to
  ``wait`` seconds for other frames to finish (holding its peer's share, and nothing else: its bytes are not read
  meanwhile), then is refused. When nothing at all is in flight, any frame may start.

There is no total by default. Frames count at their announced length, which costs the sender nothing but a header:
with a total, a few identities (which are free) that each announce their share's worth of frames and send nothing
more would hold the total for as long as the stall timeouts allow, and every honest peer's large frames would be
refused meanwhile. Per peer, that costs the sender its own streams only.

Refusals raise ``InboundBudgetExceeded``, a ``FramingError``: the stream handler gets it as it would get a malformed
frame, and the caller gets an error frame with the text.
"""

import asyncio
import contextlib
from typing import AsyncIterator, Callable, Dict, Hashable, Optional, Set

from hivemind.p2p.framing import MAX_FRAME_PAYLOAD, FramingError

MiB = 1024**2
# all peers together: none by default (see the module docstring: a total of announced lengths is cheap to fill)
DEFAULT_TOTAL_BYTES = None
# one peer: a few frames at its handler's message limit, and at least 64 MiB (tens of concurrent 2 MiB MoE chunks or
# about 5 MiB all-reduce parts); with a total, never more than a quarter of it, so that no single identity can take it
DEFAULT_PER_PEER_FLOOR = 64 * MiB
DEFAULT_PER_PEER_FRAMES = 4
DEFAULT_PER_PEER_SHARE = 4  # the per-peer limit is at most total_bytes // this
# how long a frame that fits its peer's share waits for room in the total before it is refused
DEFAULT_WAIT = 5.0
# frames up to this size are not counted: a stream's reader buffers this much (up to twice) ahead of any frame
# anyway, and small requests and end-of-stream marks keep flowing for a peer whose large frames fill its share
UNCOUNTED_FRAME_BYTES = 64 * 1024

Peer = Hashable
FrameAdmission = Callable[[int], "contextlib.AbstractAsyncContextManager[None]"]


class InboundBudgetExceeded(FramingError):
    """A peer started more frames at once than this side's inbound budget allows; the stream was refused."""


class FrameLease:
    """What one admitted frame holds of its peer's share (``nbytes``; 0 for an uncounted frame) until ``release()``,
    which gives it back once (later calls do nothing). It may outlive the frame: a request waiting for its handler,
    marked with ``park()`` (parked bytes do not count against the frames that may wait for room, see ``reserve``)."""

    __slots__ = ("nbytes", "_budget", "_peer", "_parked")

    def __init__(self, nbytes: int = 0, budget: Optional["InboundBudget"] = None, peer: Peer = None):
        self.nbytes, self._budget, self._peer, self._parked = nbytes, budget, peer, False

    def park(self) -> None:
        """The frame is complete and its request waits for the handler."""
        if self._budget is not None and not self._parked:
            self._parked = True
            self._budget._park(self._peer, self.nbytes)

    def release(self) -> None:
        budget, self._budget = self._budget, None
        if budget is not None:
            budget.release(self._peer, self.nbytes, parked=self._parked)


class PeerAdmission:
    """The admission of one peer's frames to a handler with a given ``max_message_size`` (``InboundBudget.for_peer``).

    Called with a frame's length, it is the ``FrameAdmission`` context that the frame is received in; ``hold`` and
    ``fits`` serve a stream that keeps each complete request's share until its handler takes the request."""

    def __init__(self, budget: "InboundBudget", peer: Peer, max_message_size: Optional[int]):
        self.budget, self.peer, self.max_message_size = budget, peer, max_message_size

    def __call__(self, nbytes: int) -> "contextlib.AbstractAsyncContextManager[None]":
        return self.budget.frame(self.peer, nbytes, self.max_message_size)

    async def hold(self, nbytes: int) -> FrameLease:
        """``InboundBudget.lease`` for this peer and handler."""
        return await self.budget.lease(self.peer, nbytes, self.max_message_size)

    def fits(self, nbytes: int) -> bool:
        """Whether a frame of ``nbytes`` would pass this peer's share now (the total, if any, is not checked)."""
        return self.budget.fits_peer(self.peer, nbytes, self.max_message_size)


class InboundBudget:
    """Bytes of inbound frames held at once (being received, or requests waiting for their handler), per peer and in
    all (see the module docstring)."""

    def __init__(
        self,
        total_bytes: Optional[int] = DEFAULT_TOTAL_BYTES,
        *,
        per_peer_floor: int = DEFAULT_PER_PEER_FLOOR,
        per_peer_frames: int = DEFAULT_PER_PEER_FRAMES,
        per_peer_share: int = DEFAULT_PER_PEER_SHARE,
        wait: float = DEFAULT_WAIT,
    ):
        bad_total = total_bytes is not None and total_bytes <= 0
        if bad_total or per_peer_floor <= 0 or per_peer_frames <= 0 or per_peer_share <= 0 or wait < 0:
            raise ValueError("InboundBudget limits must be positive (wait may be 0)")
        self.total_bytes, self.wait = total_bytes, wait
        self.per_peer_floor, self.per_peer_frames = per_peer_floor, per_peer_frames
        self.per_peer_share = per_peer_share
        self._by_peer: Dict[Peer, int] = {}  # shares held: admitted frames and frames waiting for the total
        self._parked: Dict[Peer, int] = {}  # the part of the shares held by requests waiting for their handler
        self._waiting: Dict[Peer, int] = {}  # frames that wait for room in their peer's share (holding nothing)
        self._total = 0  # admitted frames only
        self._waiters: Set[asyncio.Future] = set()

    def per_peer_limit(self, max_message_size: Optional[int]) -> int:
        """The bytes one peer's frames may hold at once on a handler with this ``max_message_size``."""
        largest = MAX_FRAME_PAYLOAD if max_message_size is None else max_message_size
        limit = max(self.per_peer_floor, self.per_peer_frames * largest)
        return limit if self.total_bytes is None else min(limit, self.total_bytes // self.per_peer_share)

    def held_by(self, peer: Peer) -> int:
        return self._by_peer.get(peer, 0)

    def parked_by(self, peer: Peer) -> int:
        """Bytes of the share ``held_by(peer)`` that requests waiting for their handlers hold (``FrameLease.park``)."""
        return self._parked.get(peer, 0)

    def waiting_by(self, peer: Peer) -> int:
        """Bytes of ``peer``'s frames that wait for room in its share (they hold none of it yet)."""
        return self._waiting.get(peer, 0)

    @property
    def total_held(self) -> int:
        return self._total

    async def reserve(self, peer: Peer, nbytes: int, max_message_size: Optional[int] = None) -> None:
        """Take ``nbytes`` for a frame of ``peer``; ``release`` them once its request was taken by the handler (or
        its stream ended).

        A frame that does not fit the peer's share is refused at once if it would not fit either with the peer's
        parked requests (waiting for their handlers: ``FrameLease.park``) left out, counting the frames that wait
        for room like frames in flight; otherwise it waits up to ``wait`` seconds for the parked requests to be taken.

        :raises InboundBudgetExceeded: the peer's share is full (at once, or after ``wait`` s if parked requests
            filled it) or the total stayed full for ``wait`` s
        """
        limit = self.per_peer_limit(max_message_size)
        if not self._fits_peer(peer, nbytes, limit):
            moving = self.held_by(peer) - self.parked_by(peer) + self.waiting_by(peer)
            if moving + nbytes > limit:
                raise InboundBudgetExceeded(
                    f"Peer {peer} already holds {self.held_by(peer)} bytes of requests that this peer's stream "
                    f"handlers are receiving or have not taken yet; a new {nbytes}-byte frame would exceed the "
                    f"{limit} bytes allowed per peer, so its stream is refused (finish or close earlier streams "
                    "before starting more, or give the receiving P2P a larger inbound_budget)"
                )
            await self._wait_for_peer(peer, nbytes, limit)
        self._by_peer[peer] = self.held_by(peer) + nbytes
        try:
            await self._wait_for_total(nbytes)
        except BaseException:
            self._release_share(peer, nbytes)
            self._wake()  # frames of this peer that wait for room in its share
            raise
        self._total += nbytes

    def release(self, peer: Peer, nbytes: int, *, parked: bool = False) -> None:
        """Give back what ``reserve`` took for a frame whose request was taken (or whose stream ended); ``parked``:
        the frame was marked as a request waiting for its handler (``FrameLease.park``)."""
        if parked:
            self._add(self._parked, peer, -nbytes)
        self._release_share(peer, nbytes)
        self._total -= nbytes
        self._wake()

    def _wake(self) -> None:
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)

    def fits_peer(self, peer: Peer, nbytes: int, max_message_size: Optional[int] = None) -> bool:
        """Whether ``reserve`` would pass the per-peer check for this frame now (it is uncounted, the peer holds
        nothing, or it fits the peer's share); the total, if any, is not checked."""
        return nbytes <= UNCOUNTED_FRAME_BYTES or self._fits_peer(peer, nbytes, self.per_peer_limit(max_message_size))

    async def lease(self, peer: Peer, nbytes: int, max_message_size: Optional[int] = None) -> FrameLease:
        """``reserve`` for a frame, returning what ``release()`` gives it back; frames of at most
        ``UNCOUNTED_FRAME_BYTES`` are not counted (their lease holds nothing)."""
        if nbytes <= UNCOUNTED_FRAME_BYTES:
            return FrameLease()
        await self.reserve(peer, nbytes, max_message_size)
        return FrameLease(nbytes, self, peer)

    @contextlib.asynccontextmanager
    async def frame(self, peer: Peer, nbytes: int, max_message_size: Optional[int] = None) -> AsyncIterator[None]:
        """``async with budget.frame(peer, n):`` receive the frame inside; released however the block ends.
        Frames of at most ``UNCOUNTED_FRAME_BYTES`` are not counted."""
        lease = await self.lease(peer, nbytes, max_message_size)
        try:
            yield
        finally:
            lease.release()

    def for_peer(self, peer: Peer, max_message_size: Optional[int]) -> PeerAdmission:
        """What one stream of ``peer`` to a handler with this ``max_message_size`` wraps each frame it receives in
        (a ``FrameAdmission``; see ``PeerAdmission`` for holding a request's share until its handler takes it)."""
        return PeerAdmission(self, peer, max_message_size)

    def _park(self, peer: Peer, nbytes: int) -> None:
        self._add(self._parked, peer, nbytes)

    def _release_share(self, peer: Peer, nbytes: int) -> None:
        self._add(self._by_peer, peer, -nbytes)

    @staticmethod
    def _add(counts: Dict[Peer, int], peer: Peer, nbytes: int) -> None:
        left = counts.get(peer, 0) + nbytes
        if left:
            counts[peer] = left
        else:
            del counts[peer]

    def _fits_peer(self, peer: Peer, nbytes: int, limit: int) -> bool:
        held = self.held_by(peer)
        return not held or held + nbytes <= limit

    async def _wait_for_peer(self, peer: Peer, nbytes: int, limit: int) -> None:
        def refusal() -> str:
            return (
                f"Peer {peer} holds {self.held_by(peer)} bytes of requests that this peer's stream handlers have not "
                f"taken yet or are receiving; a new {nbytes}-byte frame did not fit in the {limit} bytes allowed per "
                f"peer within {self.wait} s, so its stream is refused (its handlers are slow to take their input: "
                "retry later, or give the receiving P2P a larger inbound_budget)"
            )

        self._add(self._waiting, peer, nbytes)
        try:
            await self._wait_until(lambda: self._fits_peer(peer, nbytes, limit), refusal)
        finally:
            self._add(self._waiting, peer, -nbytes)

    async def _wait_for_total(self, nbytes: int) -> None:
        def refusal() -> str:
            return (
                f"This peer's stream handlers are receiving {self._total} bytes of frames from all peers; a new "
                f"{nbytes}-byte frame did not fit in the {self.total_bytes} bytes allowed in all within {self.wait} "
                "s, so its stream is refused (retry later, or give the receiving P2P a larger inbound_budget)"
            )

        await self._wait_until(lambda: self._fits_total(nbytes), refusal)

    async def _wait_until(self, fits: Callable[[], bool], refusal: Callable[[], str]) -> None:
        """Wait up to ``wait`` seconds for ``fits()``, checked again after each release; then refuse."""
        if fits():
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait
        while not fits():
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise InboundBudgetExceeded(refusal())
            waiter = loop.create_future()
            self._waiters.add(waiter)
            try:
                await asyncio.wait({waiter}, timeout=remaining)
            finally:
                self._waiters.discard(waiter)
                waiter.cancel()

    def _fits_total(self, nbytes: int) -> bool:
        return self.total_bytes is None or self._total == 0 or self._total + nbytes <= self.total_bytes
