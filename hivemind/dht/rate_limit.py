"""
Per-peer token buckets that cap how much store work a remote peer may ask for (flood protection, sans-IO).

The unit is one *item*: what storing one small item costs (some 10 us of the event loop). Bytes cost too, weighed by
what decoding them costs: one item per STORE_BYTES_PER_ITEM bytes, and STRUCTURE_BYTE_WEIGHT times more for each byte
that may start an array, a map or an ext type (a tuple): those are decoded by Python code, one call or one walk step
each (about 1 us, a thousand times a plain byte), and 4 MiB of nested tuples used to take seconds to decode.
"""

import time
from typing import Callable, Dict, Hashable, Optional, Tuple

DEFAULT_BURST_ITEMS = 20000  # a new peer receiving replicas may get thousands of items in one request
DEFAULT_ITEMS_PER_SECOND = 2000.0
# a whole dictionary sent to be stored costs one item per entry: what its bytes cost (decode_cost) is charged before
# it is decoded (a peer out of tokens gets nothing decoded), the rest once its entries are counted
DICTIONARY_BYTES_PER_ITEM = 128  # kept for compatibility: decode_cost charges whole dictionaries now
# a whole dictionary's subkeys are taken as received (for validators and the dictionary's size) unless some entry was
# dropped on decoding; then they are encoded again, which costs about twice their decoding
REENCODING_COST_FACTOR = 2
STORE_BYTES_PER_ITEM = 2048
STRUCTURE_BYTE_WEIGHT = 256
# fixmap, fixarray, ext 8/16/32, fixext 1..16, array 16/32, map 16/32: a byte that may begin a costly msgpack object
_STRUCTURE_BYTES = bytes(range(0x80, 0xA0)) + bytes(
    (0xC7, 0xC8, 0xC9, 0xD4, 0xD5, 0xD6, 0xD7, 0xD8, 0xDC, 0xDD, 0xDE, 0xDF)
)
_OTHER_BYTES = bytes(byte for byte in range(256) if byte not in _STRUCTURE_BYTES)
# a document that starts with a scalar (nil, bool, int, float, str, bin) holds nothing else: its bytes are payload
_SCALAR_STARTS = frozenset(byte for byte in range(256) if byte not in _STRUCTURE_BYTES)


def decode_cost(data: bytes) -> float:
    """What decoding ``data`` (msgpack, maybe with a suffix) costs, in items; an upper bound, computed at C speed."""
    if not data:
        return 0.0
    structure = 0 if data[0] in _SCALAR_STARTS else len(data.translate(None, _OTHER_BYTES))
    return (len(data) + STRUCTURE_BYTE_WEIGHT * structure) / STORE_BYTES_PER_ITEM


def store_item_cost(subkey: bytes, value: bytes, whole_dictionary: bool = False) -> float:
    """What one store item costs in items: one, plus decoding its subkey and value (a whole dictionary's value is
    charged on its own, see PeerRateLimiter.allow_dictionary)."""
    return 1.0 + decode_cost(subkey) + (0.0 if whole_dictionary else decode_cost(value))


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

    def allow(self, peer: Hashable, num_items: float) -> bool:
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

    def allow_dictionary(
        self, peer: Optional[Hashable], value: bytes, num_entries: Optional[int] = None, reencoded: bool = False
    ) -> bool:
        """
        Charge a whole dictionary (its encoded ``value``): without ``num_entries``, what it costs to decode; with it,
        the entries that this did not already pay for; with ``reencoded``, encoding its subkeys again (about twice
        their decoding). A dictionary from no remote peer (``peer`` None) is free.
        """
        if peer is None:
            return True
        prepaid = decode_cost(value)
        if reencoded:
            return self.allow(peer, REENCODING_COST_FACTOR * prepaid)
        return self.allow(peer, prepaid if num_entries is None else max(0.0, num_entries - prepaid))

    def _forget_idle(self, now: float) -> None:
        for peer in [peer for peer in self._buckets if self._tokens(peer, now) >= self.burst]:
            del self._buckets[peer]

    def __len__(self) -> int:
        return len(self._buckets)
