"""Wire forms of node ids and peer ids, memoized: every find response carries up to 20 of each."""

from typing import Dict

from hivemind.dht.routing import DHTID
from hivemind.p2p import PeerID

MAX_CACHED_IDS = 16384  # per kind; the caches are simply cleared when full


class IdCodec:
    """Converts DHTID <-> 20 bytes and bytes -> PeerID, reusing results for ids seen before."""

    def __init__(self):
        self._node_ids: Dict[bytes, DHTID] = {}
        self._node_bytes: Dict[DHTID, bytes] = {}
        self._peer_ids: Dict[bytes, PeerID] = {}

    def node_id_from_bytes(self, raw: bytes) -> DHTID:
        """Parse a 20-byte node id (ValueError for any other length)."""
        node_id = self._node_ids.get(raw)
        if node_id is None:
            node_id = DHTID.from_bytes(raw)
            if len(self._node_ids) >= MAX_CACHED_IDS:
                self._node_ids.clear()
            self._node_ids[raw] = node_id
        return node_id

    def node_id_to_bytes(self, node_id: DHTID) -> bytes:
        raw = self._node_bytes.get(node_id)
        if raw is None:
            raw = node_id.to_bytes()
            if len(self._node_bytes) >= MAX_CACHED_IDS:
                self._node_bytes.clear()
            self._node_bytes[node_id] = raw
        return raw

    def peer_id_from_bytes(self, raw: bytes) -> PeerID:
        """PeerID objects compute their base58 form on creation, which is costly: reuse them."""
        peer_id = self._peer_ids.get(raw)
        if peer_id is None:
            peer_id = PeerID(raw)
            if len(self._peer_ids) >= MAX_CACHED_IDS:
                self._peer_ids.clear()
            self._peer_ids[raw] = peer_id
        return peer_id
