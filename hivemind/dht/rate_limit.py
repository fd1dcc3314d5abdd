"""Per-peer token buckets that cap how many store items a remote peer may send (flood protection, sans-IO)."""

import time
from typing import Callable, Dict, Hashable, Optional, Tuple

DEFAULT_BURST_ITEMS = 20000  # a new peer receiving replicas may get thousands of items in one request
DEFAULT_ITEMS_PER_SECOND = 2000.0
# a whole dictionary sent to be stored costs one item per entry: one item per this many of its bytes is charged before
# it is decoded (a peer out of tokens gets nothing decoded), the rest once its entries are counted
DICTIONARY_BYTES_PER_ITEM = 128


class PeerRateLimiter:
    """
    Each peer may spend up to ``burst`` items at once; its allowance refills at ``rate`` items per second. A request
    that does not fit is refused whole (nothing is spent). Peers whose buckets are full again are forgotten, so the
    table stays as small as the set of recently active peers.
    """

    def __init__(
        self,
        burst: float = DEFAULT_BURST_ITEMS,
        rate: float = DEFAULT_ITEMS_PER_SECOND,
        clock: Callable[[], float] = time.monotonic,
    ):
        if burst <= 0 or rate <= 0:
            raise ValueError(f"burst and rate must be positive, got {burst=}, {rate=}")
        self.burst, self.rate, self.clock = burst, rate, clock
        self._buckets: Dict[Hashable, Tuple[float, float]] = {}  # peer -> (tokens left, time of last update)

    def _tokens(self, peer: Hashable, now: float) -> float:
        tokens, updated = self._buckets.get(peer, (self.burst, now))
        return min(self.burst, tokens + (now - updated) * self.rate)

    def allow(self, peer: Hashable, num_items: int) -> bool:
        """Spend ``num_items`` tokens of ``peer`` if it has them; returns whether the request may proceed."""
        now = self.clock()
        tokens = self._tokens(peer, now)
        if num_items > tokens:
            self._buckets[peer] = (tokens, now)
            return False
        self._buckets[peer] = (tokens - num_items, now)
        if len(self._buckets) > 1024:
            self._forget_idle(now)
        return True

    def allow_dictionary(self, peer: Optional[Hashable], num_bytes: int, num_entries: Optional[int] = None) -> bool:
        """Charge a whole dictionary: without ``num_entries``, what its ``num_bytes`` cost to decode; with it, the
        entries that this did not already pay for. A dictionary from no remote peer (``peer`` None) costs nothing."""
        if peer is None:
            return True
        prepaid = num_bytes // DICTIONARY_BYTES_PER_ITEM
        return self.allow(peer, prepaid if num_entries is None else max(0, num_entries - prepaid))

    def _forget_idle(self, now: float) -> None:
        for peer in [peer for peer in self._buckets if self._tokens(peer, now) >= self.burst]:
            del self._buckets[peer]

    def __len__(self) -> int:
        return len(self._buckets)
