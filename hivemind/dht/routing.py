"""Kademlia identifiers, k-buckets and the routing table: pure data structures, no I/O."""

from __future__ import annotations

import hashlib
import heapq
import os
from bisect import bisect_right
from itertools import chain
from typing import TYPE_CHECKING, Any, Dict, Iterable, Iterator, List, Optional, Sequence, Set, Tuple, Union

from hivemind.utils.serializer import MSGPackSerializer
from hivemind.utils.timed_storage import get_dht_time

DHTKey = Subkey = DHTValue = Any  # any msgpack-serializable object
BinaryDHTValue = bytes
if TYPE_CHECKING:  # the routing logic only needs peer ids to be hashable; it never imports the p2p layer
    from hivemind.p2p import PeerID


class DHTID(int):
    """A 160-bit Kademlia identifier of a node or a key; the distance between two ids is their XOR."""

    HASH_FUNC = hashlib.sha1
    HASH_NBYTES = 20  # SHA-1 digest size
    RANGE = MIN, MAX = 0, 2 ** (HASH_NBYTES * 8)  # [MIN, MAX)

    def __new__(cls, value: int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"DHTID must be built from an int, got {type(value).__name__}: {value!r}")
        if not cls.MIN <= value < cls.MAX:
            raise ValueError(f"DHTID must lie in [0, 2**160), got {value}")
        return super().__new__(cls, value)

    @classmethod
    def generate(cls, source: Optional[Any] = None, nbits: int = 255) -> DHTID:
        """
        Hash ``source`` into a DHTID: SHA-1 of ``source`` if it is bytes, else SHA-1 of its msgpack encoding.

        :param source: a key to hash; if None, hash ``nbits`` fresh random bits (os.urandom, so that seeding
          the ``random`` module for reproducible training never makes two peers share a node id)
        """
        if source is None:
            source = os.urandom((nbits + 7) // 8)
        if not isinstance(source, bytes):
            source = MSGPackSerializer.dumps(source)
        return cls._in_range(int.from_bytes(cls.HASH_FUNC(source).digest(), "big"))

    @classmethod
    def _in_range(cls, value: int) -> DHTID:
        """Wrap a value known to lie in [0, 2**160) (an unsigned 20-byte number) without checking it again."""
        return int.__new__(cls, value)

    def xor_distance(self, other: Union[int, Sequence[int]]) -> Union[int, List[int]]:
        """XOR distance to another id, or a list of distances to each id of a sequence."""
        if isinstance(other, int):
            return int(self) ^ int(other)
        return [int(self) ^ int(item) for item in other]

    @classmethod
    def longest_common_prefix_length(cls, *ids: int) -> int:
        """The number of leading bits (of the 160-bit big-endian form) that all given ids share."""
        if not ids:
            raise ValueError("longest_common_prefix_length needs at least one id")
        first, differing_bits = int(ids[0]), 0
        for other in ids[1:]:
            differing_bits |= first ^ int(other)
        return cls.HASH_NBYTES * 8 - differing_bits.bit_length()

    def to_bytes(self, length: int = HASH_NBYTES, byteorder: str = "big", *, signed: bool = False) -> bytes:
        """The canonical wire form: 20 bytes, big-endian."""
        return int.to_bytes(self, length, byteorder, signed=signed)

    @classmethod
    def from_bytes(cls, raw: bytes, byteorder: str = "big", *, signed: bool = False) -> DHTID:
        """Parse the 20-byte wire form; raises ValueError for any other length (e.g. a malformed remote id)."""
        if not isinstance(raw, (bytes, bytearray, memoryview)):
            raise TypeError(f"DHTID.from_bytes expects bytes, got {type(raw).__name__}")
        if len(raw) != cls.HASH_NBYTES:
            raise ValueError(f"a DHTID is exactly {cls.HASH_NBYTES} bytes long, got {len(raw)} bytes")
        value = int.from_bytes(raw, byteorder, signed=signed)
        return cls(value) if signed else cls._in_range(value)  # unsigned 20 bytes are always in range

    def __bytes__(self) -> bytes:
        return self.to_bytes()

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({hex(self)})"


class KBucket:
    """
    Up to ``size`` nodes whose ids lie in [lower, upper), ordered from least to most recently seen,
    plus up to ``size`` replacement nodes that take the place of nodes removed later.
    """

    def __init__(self, lower: int, upper: int, size: int, depth: int = 0):
        assert DHTID.MIN <= lower < upper <= DHTID.MAX, (lower, upper)
        self.lower, self.upper = lower, upper  # the bucket holds ids in [lower, upper)
        self.size, self.depth = size, depth  # depth = number of splits from the whole id space
        self.nodes: Dict[DHTID, PeerID] = {}  # insertion order = least recently seen first
        self.replacements: Dict[DHTID, PeerID] = {}  # insertion order = least recently seen first
        self.ping_requested: Set[DHTID] = set()
        self.last_updated = get_dht_time()

    def covers(self, node_id: int) -> bool:
        return self.lower <= node_id < self.upper

    def add_or_update_node(self, node_id: DHTID, peer_id: PeerID) -> bool:
        """
        Mark a node as seen just now. Returns True if the node is (now) in the bucket; False if the bucket is
        full, in which case the node is kept as the most recent replacement node.
        """
        if node_id in self.nodes or len(self.nodes) < self.size:
            self.nodes.pop(node_id, None)
            self.nodes[node_id] = peer_id  # move to the most-recent end
            self.replacements.pop(node_id, None)
            self.ping_requested.discard(node_id)
            self.last_updated = get_dht_time()
            return True
        self.replacements.pop(node_id, None)
        for other_id in [other for other, holder in self.replacements.items() if holder == peer_id]:
            del self.replacements[other_id]  # one slot per peer: a peer under many ids cannot push the others out
        self.replacements[node_id] = peer_id
        while len(self.replacements) > self.size:
            del self.replacements[next(iter(self.replacements))]  # forget the stalest replacement
        return False

    def request_ping_node(self) -> Optional[Tuple[DHTID, PeerID]]:
        """The least recently seen node that was not already handed out for pinging (None if there is none)."""
        for node_id, peer_id in self.nodes.items():
            if node_id not in self.ping_requested:
                self.ping_requested.add(node_id)
                return node_id, peer_id
        return None

    def __getitem__(self, node_id: DHTID) -> PeerID:
        return self.nodes[node_id] if node_id in self.nodes else self.replacements[node_id]

    def remove(self, node_id: DHTID) -> Optional[Tuple[DHTID, PeerID]]:
        """
        Remove a node or a replacement node (KeyError if absent). If an active node was removed and replacements
        exist, the most recently seen replacement takes the freed slot: returns its (node_id, peer_id), else None.
        """
        if node_id in self.replacements:
            del self.replacements[node_id]
            return None
        if node_id not in self.nodes:
            raise KeyError(f"node {node_id!r} is not in bucket [{self.lower:#x}, {self.upper:#x})")
        del self.nodes[node_id]
        self.ping_requested.discard(node_id)
        if not self.replacements:
            return None
        promoted_id = next(reversed(self.replacements))
        promoted_peer_id = self.replacements.pop(promoted_id)
        self.nodes[promoted_id] = promoted_peer_id
        return promoted_id, promoted_peer_id

    def __delitem__(self, node_id: DHTID) -> None:
        self.remove(node_id)

    def __contains__(self, node_id: DHTID) -> bool:
        return node_id in self.nodes

    def __len__(self) -> int:
        return len(self.nodes)

    def split(self) -> Tuple[KBucket, KBucket]:
        """Split into two buckets over the two halves of the range, keeping each node's recency order."""
        midpoint = (self.lower + self.upper) // 2
        left, right = (
            KBucket(lo, hi, self.size, self.depth + 1) for lo, hi in ((self.lower, midpoint), (midpoint, self.upper))
        )
        for node_id, peer_id in chain(self.nodes.items(), self.replacements.items()):
            bucket = left if node_id < midpoint else right
            bucket.add_or_update_node(node_id, peer_id)
        for bucket in (left, right):
            bucket.ping_requested = self.ping_requested & bucket.nodes.keys()
            bucket.last_updated = self.last_updated
        return left, right

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}({len(self.nodes)} nodes + {len(self.replacements)} "
            f"replacements, range=[{self.lower:#x}, {self.upper:#x}), depth={self.depth})"
        )


class RoutingTable:
    """
    The Kademlia routing table of the node ``node_id``: a list of k-buckets covering [0, 2**160).
    A full bucket is split if it contains ``node_id`` or its depth is not a multiple of ``depth_modulo``;
    otherwise the newcomer becomes a replacement node and the caller is asked to ping the stalest node.

    Item access works both ways: ``table[node_id] -> peer_id`` and ``table[peer_id] -> node_id``.
    """

    def __init__(self, node_id: DHTID, bucket_size: int, depth_modulo: int):
        if bucket_size < 1 or depth_modulo < 1:
            raise ValueError(f"bucket_size and depth_modulo must be positive, got {bucket_size}, {depth_modulo}")
        self.node_id, self.bucket_size, self.depth_modulo = DHTID(node_id), bucket_size, depth_modulo
        self.buckets: List[KBucket] = [KBucket(DHTID.MIN, DHTID.MAX, bucket_size)]
        self._bucket_lowers: List[int] = [DHTID.MIN]  # sorted lower bounds of self.buckets, for bisection
        self._node_by_peer: Dict[PeerID, DHTID] = {}  # active (non-replacement) nodes only
        self._peer_by_node: Dict[DHTID, PeerID] = {}

    def bucket_index_for(self, node_id: int) -> int:
        if not DHTID.MIN <= node_id < DHTID.MAX:
            raise ValueError(f"node id {node_id} is outside [0, 2**160)")
        return bisect_right(self._bucket_lowers, node_id) - 1

    def get_bucket_index(self, node_id: int) -> int:
        """The index in ``buckets`` of the bucket whose range holds ``node_id`` (same as bucket_index_for)."""
        return self.bucket_index_for(node_id)

    @property
    def peer_id_to_uid(self) -> Dict[PeerID, DHTID]:
        """{peer id: node id} of the nodes in the table (petals lists the known peers from it); read-only use."""
        return self._node_by_peer

    @property
    def uid_to_peer_id(self) -> Dict[DHTID, PeerID]:
        """{node id: peer id} of the nodes in the table; read-only use."""
        return self._peer_by_node

    def add_or_update_node(self, node_id: DHTID, peer_id: PeerID) -> Optional[Tuple[DHTID, PeerID]]:
        """
        Record that ``node_id`` at ``peer_id`` was seen just now (own id is ignored).

        :returns: None if the node is in the table now; if its bucket is full and cannot be split,
          the (node_id, peer_id) of the least recently seen node, which the caller should ping and
          delete from the table (``del table[node_id]``) if it does not answer; the newcomer then takes its place.
        """
        node_id = DHTID(node_id)
        if node_id == self.node_id:
            return None
        while True:
            index = self.bucket_index_for(node_id)
            bucket = self.buckets[index]
            self._forget_mapping(node_id, peer_id)
            if bucket.add_or_update_node(node_id, peer_id):
                self._peer_by_node[node_id], self._node_by_peer[peer_id] = peer_id, node_id
                return None
            if self._is_splittable(bucket):
                self.split_bucket(index)
                continue
            return bucket.request_ping_node()

    def _is_splittable(self, bucket: KBucket) -> bool:
        """Split rule: the own bucket always splits; others only at depths that are not multiples of depth_modulo."""
        return bucket.covers(self.node_id) or bucket.depth % self.depth_modulo > 0

    def _forget_mapping(self, node_id: DHTID, peer_id: PeerID) -> None:
        """Before (re)adding node_id at peer_id: drop stale entries for the same peer or the same node."""
        old_peer_id = self._peer_by_node.get(node_id)
        if old_peer_id is not None and old_peer_id != peer_id:
            del self._peer_by_node[node_id]
            self._node_by_peer.pop(old_peer_id, None)
        old_node_id = self._node_by_peer.get(peer_id)
        if old_node_id is not None and old_node_id != node_id:
            del self[old_node_id]  # the peer restarted with another node id: its old id is gone

    def split_bucket(self, index: int) -> None:
        """Replace the bucket at ``index`` with its two halves."""
        left, right = self.buckets[index].split()
        self.buckets[index : index + 1] = [left, right]
        self._bucket_lowers[index : index + 1] = [left.lower, right.lower]
        for bucket in (left, right):  # a replacement node may have been promoted to a full node by the split
            for node_id, peer_id in bucket.nodes.items():
                self._peer_by_node[node_id], self._node_by_peer[peer_id] = peer_id, node_id

    def get(self, *, node_id: Optional[DHTID] = None, peer_id: Optional[PeerID] = None, default=None):
        """Find the peer id of a node (``node_id=``) or the node id of a peer (``peer_id=``); else ``default``."""
        if (node_id is None) == (peer_id is None):
            raise ValueError("pass exactly one of node_id= or peer_id=")
        found = self._peer_by_node.get(node_id) if peer_id is None else self._node_by_peer.get(peer_id)
        return default if found is None else found

    def holder_of(self, node_id: DHTID) -> Optional[PeerID]:
        """The peer that ``node_id`` maps to, as an active or as a replacement node; None if the id is unknown."""
        bucket = self.buckets[self.bucket_index_for(node_id)]
        return bucket.nodes.get(node_id, bucket.replacements.get(node_id))

    def __getitem__(self, item: Union[DHTID, PeerID]) -> Union[PeerID, DHTID]:
        return self._peer_by_node[item] if isinstance(item, int) else self._node_by_peer[item]

    def __setitem__(self, node_id: DHTID, peer_id: PeerID) -> None:
        self.add_or_update_node(node_id, peer_id)

    def __contains__(self, item: Union[DHTID, PeerID]) -> bool:
        return item in self._peer_by_node if isinstance(item, int) else item in self._node_by_peer

    def __delitem__(self, node_id: DHTID) -> None:
        """Remove a node (e.g. one that failed to answer a ping); a replacement node may take its slot."""
        promoted = self.buckets[self.bucket_index_for(node_id)].remove(node_id)  # KeyError if unknown
        peer_id = self._peer_by_node.pop(node_id, None)
        if peer_id is not None and self._node_by_peer.get(peer_id) == node_id:
            del self._node_by_peer[peer_id]
        if promoted is not None:
            promoted_id, promoted_peer_id = promoted
            stale_node_id = self._node_by_peer.get(promoted_peer_id)
            if stale_node_id is not None and stale_node_id != promoted_id:
                del self[stale_node_id]
            self._peer_by_node[promoted_id], self._node_by_peer[promoted_peer_id] = promoted_peer_id, promoted_id

    def __len__(self) -> int:
        return len(self._peer_by_node)

    def __iter__(self) -> Iterator[DHTID]:
        return iter(self._peer_by_node)

    def items(self) -> Iterator[Tuple[DHTID, PeerID]]:
        """All active (node_id, peer_id) pairs, in no particular order."""
        return iter(list(self._peer_by_node.items()))

    def get_nearest_neighbors(
        self, query_id: int, k: int, exclude: Optional[Union[DHTID, Iterable[DHTID]]] = None
    ) -> List[Tuple[DHTID, PeerID]]:
        """
        The ``k`` active nodes nearest to ``query_id`` by XOR distance, nearest first, as (node_id, peer_id) pairs.

        :param exclude: a node id (or a collection of node ids) to leave out, e.g. the requester's own id

        Buckets are dyadic ranges, so the XOR distances of the nodes of different buckets occupy disjoint intervals:
        visiting buckets by their smallest possible distance and sorting within each bucket costs
        O(#buckets log #buckets + k log k) instead of sorting the whole table.
        """
        if k <= 0:
            return []
        excluded = set() if exclude is None else {exclude} if isinstance(exclude, int) else set(exclude)
        query_id = int(query_id)

        def min_distance(bucket: KBucket) -> int:
            # distance to the bucket's range: the bits above the range's width must differ as in lower ^ query
            width_bits = (bucket.upper - bucket.lower).bit_length() - 1
            return ((bucket.lower ^ query_id) >> width_bits) << width_bits

        result: List[Tuple[DHTID, PeerID]] = []
        bucket_heap = [(min_distance(bucket), index) for index, bucket in enumerate(self.buckets)]
        heapq.heapify(bucket_heap)
        while bucket_heap and len(result) < k:
            bucket = self.buckets[heapq.heappop(bucket_heap)[1]]
            nodes = sorted(bucket.nodes.items(), key=lambda item: item[0] ^ query_id)
            result.extend(item for item in nodes if item[0] not in excluded)
        return result[:k]

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__}(own id {self.node_id!r}, k={self.bucket_size}, b={self.depth_modulo}):"]
        lines.extend(f"  {bucket!r}" for bucket in self.buckets)
        return "\n".join(lines)
