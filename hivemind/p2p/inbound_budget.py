"""How many bytes of request frames the stream handlers of one ``P2P`` hold at once, per remote peer and in all.

A frame's payload buffer grows only as its bytes arrive, but a peer chooses how many streams it opens and how much of
each frame it sends: frames that are started and left unfinished on many streams would each hold what arrived of them
for as long as the stall timeouts of ``framing`` allow, and complete requests wait in each stream's queue until its
handler takes them. ``InboundBudget`` counts the length that a frame's header announced from the moment it is
accepted until its request is taken by the handler (``protobuf_streams`` holds it with a ``FrameLease`` while the
request waits) or its stream ends; frames of at most ``UNCOUNTED_FRAME_BYTES`` (64 KiB) are not counted:

- **per peer first**: a new frame whose peer already holds frames (in flight or waiting for a handler) is refused at
  once if it would take that peer past ``per_peer_limit(max_message_size)``. A peer that holds nothing may always
  start one frame (up to the handler's ``max_message_size``), so no honest message is too large for the budget alone.
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
import functools
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
    which gives it back once (later calls do nothing). It may outlive the frame: a request waiting for its handler."""

    __slots__ = ("nbytes", "_release")

    def __init__(self, nbytes: int = 0, release: Optional[Callable[[], None]] = None):
        self.nbytes, self._release = nbytes, release

    def release(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()


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
        self._total = 0  # admitted frames only
        self._waiters: Set[asyncio.Future] = set()

    def per_peer_limit(self, max_message_size: Optional[int]) -> int:
        """The bytes one peer's frames may hold at once on a handler with this ``max_message_size``."""
        largest = MAX_FRAME_PAYLOAD if max_message_size is None else max_message_size
        limit = max(self.per_peer_floor, self.per_peer_frames * largest)
        return limit if self.total_bytes is None else min(limit, self.total_bytes // self.per_peer_share)

    def held_by(self, peer: Peer) -> int:
        return self._by_peer.get(peer, 0)

    @property
    def total_held(self) -> int:
        return self._total

    async def reserve(self, peer: Peer, nbytes: int, max_message_size: Optional[int] = None) -> None:
        """Take ``nbytes`` for a frame of ``peer``; ``release`` them once its request was taken by the handler (or
        its stream ended).

        :raises InboundBudgetExceeded: the peer's share is full (at once) or the total stayed full for ``wait`` s
        """
        held, limit = self.held_by(peer), self.per_peer_limit(max_message_size)
        if held and held + nbytes > limit:
            raise InboundBudgetExceeded(
                f"Peer {peer} already holds {held} bytes of requests that this peer's stream handlers are receiving "
                f"or have not taken yet; a new {nbytes}-byte frame would exceed the {limit} bytes allowed per peer, "
                "so its stream is refused (finish or close earlier streams before starting more, or give the "
                "receiving P2P a larger inbound_budget)"
            )
        self._by_peer[peer] = held + nbytes
        try:
            await self._wait_for_total(nbytes)
        except BaseException:
            self._release_share(peer, nbytes)
            raise
        self._total += nbytes

    def release(self, peer: Peer, nbytes: int) -> None:
        """Give back what ``reserve`` took for a frame whose request was taken (or whose stream ended)."""
        self._release_share(peer, nbytes)
        self._total -= nbytes
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)

    def fits_peer(self, peer: Peer, nbytes: int, max_message_size: Optional[int] = None) -> bool:
        """Whether ``reserve`` would pass the per-peer check for this frame now (it is uncounted, the peer holds
        nothing, or it fits the peer's share); the total, if any, is not checked."""
        if nbytes <= UNCOUNTED_FRAME_BYTES:
            return True
        held = self.held_by(peer)
        return not held or held + nbytes <= self.per_peer_limit(max_message_size)

    async def lease(self, peer: Peer, nbytes: int, max_message_size: Optional[int] = None) -> FrameLease:
        """``reserve`` for a frame, returning what ``release()`` gives it back; frames of at most
        ``UNCOUNTED_FRAME_BYTES`` are not counted (their lease holds nothing)."""
        if nbytes <= UNCOUNTED_FRAME_BYTES:
            return FrameLease()
        await self.reserve(peer, nbytes, max_message_size)
        return FrameLease(nbytes, functools.partial(self.release, peer, nbytes))

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

    def _release_share(self, peer: Peer, nbytes: int) -> None:
        left = self._by_peer[peer] - nbytes
        if left:
            self._by_peer[peer] = left
        else:
            del self._by_peer[peer]

    async def _wait_for_total(self, nbytes: int) -> None:
        if self._fits_total(nbytes):
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait
        while not self._fits_total(nbytes):
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise InboundBudgetExceeded(
                    f"This peer's stream handlers are receiving {self._total} bytes of frames from all peers; a new "
                    f"{nbytes}-byte frame did not fit in the {self.total_bytes} bytes allowed in all within "
                    f"{self.wait} s, so its stream is refused (retry later, or give the receiving P2P a larger "
                    "inbound_budget)"
                )
            waiter = loop.create_future()
            self._waiters.add(waiter)
            try:
                await asyncio.wait({waiter}, timeout=remaining)
            finally:
                self._waiters.discard(waiter)
                waiter.cancel()

    def _fits_total(self, nbytes: int) -> bool:
        return self.total_bytes is None or self._total == 0 or self._total + nbytes <= self.total_bytes
