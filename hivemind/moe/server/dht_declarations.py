"""What runs inside the DHT process for expert servers and get_experts: storing and reading declarations of experts.

declare_experts, get_experts (hivemind.moe.server.dht_handler) and the connection handlers send these coroutines to
the DHT process, which imports this module to run them: neither it nor the packages above it import torch, so the
DHT process stays small (see docs/moe.md).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

from hivemind.dht import DHT, DHTNode
from hivemind.moe.expert_uid import (
    FLAT_EXPERT,
    UID_DELIMITER,
    ExpertInfo,
    ExpertUID,
    parse_peer_id,
    split_uid,
)
from hivemind.utils.logging import get_logger

__all__ = ["declaration_entries", "parse_declared_peer", "daemon_listen_maddr"]

logger = get_logger(__name__)


def declaration_entries(
    uids: Sequence[ExpertUID], peer_id: str
) -> Tuple[List[str], List[object], List[Optional[int]]]:
    """The (keys, values, subkeys) that announce ``uids`` hosted at ``peer_id`` (base58).

    For ``ffn.1.2.3``: ``ffn.1.2.3`` -> peer id; ``ffn.1.2.`` [3], ``ffn.1.`` [2] -> (uid, peer id). A 1-D uid
    ``ffn.5`` is also stored at ``ffn.5.`` under the FLAT_EXPERT subkey. The bare type prefix ``ffn.`` never is.
    """
    keys, values, subkeys = [], [], []
    for uid in uids:
        keys.append(uid), values.append(peer_id), subkeys.append(None)
        prefix, coordinate = split_uid(uid)
        if UID_DELIMITER not in prefix[:-1]:  # a 1-D uid: `ffn.5` also at `ffn.5.` under FLAT_EXPERT
            keys.append(uid + UID_DELIMITER), values.append((uid, peer_id)), subkeys.append(FLAT_EXPERT)
        while UID_DELIMITER in prefix[:-1]:  # every proper prefix with at least one coordinate
            keys.append(prefix), values.append((uid, peer_id)), subkeys.append(coordinate)
            prefix, coordinate = split_uid(prefix)
    return keys, values, subkeys


async def _store_declarations(_dht: DHT, node: DHTNode, uids: List[ExpertUID], expires_at: float) -> Dict:
    keys, values, subkeys = declaration_entries(uids, node.peer_id.to_base58())
    return await node.store_many(keys, values, expires_at, subkeys=subkeys, num_workers=node.num_workers)


async def _find_declared_peers(
    _dht: DHT, node: DHTNode, uids: List[ExpertUID], valid_until: Optional[float]
) -> List[Optional[ExpertInfo]]:
    found = await node.get_many(uids, valid_until, num_workers=node.num_workers)
    return [parse_declared_peer(uid, found[uid]) for uid in uids]


def parse_declared_peer(uid: ExpertUID, entry) -> Optional[ExpertInfo]:
    """ExpertInfo from the regular value stored under ``uid``, or None if absent or not a peer id string."""
    if entry is None:
        return None
    peer_id = parse_peer_id(entry.value)
    if peer_id is None:
        logger.debug(f"Ignored an announcement of {uid!r} whose value is not a libp2p peer id")
        return None
    return ExpertInfo(uid, peer_id)


async def daemon_listen_maddr(_dht: DHT, node: DHTNode) -> str:
    """Runs inside the DHT process: the control address of its p2pd (connection handlers open clients of it)."""
    return str(node.p2p.daemon_listen_maddr)
