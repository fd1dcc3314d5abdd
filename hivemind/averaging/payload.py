"""What averagers exchange besides tensors: the schema hash of their tensors and the gather payload of each step."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple

import torch

from hivemind.dht.routing import DHTID
from hivemind.p2p import PeerID
from hivemind.utils.serializer import MSGPackSerializer

__all__ = [
    "compute_schema_hash",
    "encode_gather",
    "decode_gather",
    "decode_group_gathered",
    "GatheredInfo",
    "MalformedGatherError",
    "MAX_GROUP_GATHER_ITEMS",
    "count_items",
]

NUM_MODES = 3  # AveragingMode values: NODE = 0, CLIENT = 1, AUX = 2
# items (lists, tuples and dicts, and their elements) in the user objects of a whole group: each payload is small, but
# an empty list is one byte of msgpack and ~70 bytes of memory, so a leader listing a thousand members with payloads
# of empty lists would make every member decode ~18 GB of them (and spend minutes of its event loop on it)
MAX_GROUP_GATHER_ITEMS = MSGPackSerializer.MAX_ITEMS
EXT_OBJECT_ITEMS = 8  # what an object of a registered ext type counts towards it (its memory, in empty lists)
_SCALARS = (type(None), bool, int, float, str, bytes)


class MalformedGatherError(ValueError):
    """A group member's gather payload is not [bandwidth, mode, msgpack(user object)]."""


def compute_schema_hash(tensors: Sequence[torch.Tensor]) -> bytes:
    """A 20-byte hash of the shapes, dtypes, layouts, devices and flags of ``tensors``: averagers average together
    only if their hashes are equal."""
    descriptors = [
        dict(
            size=str(tensor.size()),
            dtype=str(tensor.dtype),
            layout=str(tensor.layout),
            device=str(tensor.device),
            requires_grad=str(tensor.requires_grad),
            pin_memory=str(tensor.device.type == "cpu" and tensor.is_pinned()),
            compression="0",
        )
        for tensor in tensors
    ]
    return DHTID.generate(source=descriptors).to_bytes()


def encode_gather(bandwidth: Optional[float], mode: int, user_object: Any) -> bytes:
    """The bytes a peer contributes to its group: ``msgpack([bandwidth, mode, msgpack(user_object)])``."""
    return MSGPackSerializer.dumps([bandwidth, int(mode), MSGPackSerializer.dumps(user_object)])


@dataclass(frozen=True)
class GatheredInfo:
    bandwidth: Optional[float]
    mode: int
    user_object: Any
    items: int = 0  # lists, tuples and dicts in the user object and their elements (see count_items)


def count_items(obj: Any) -> int:
    """Lists, tuples and dicts in ``obj`` and their elements (a dict's keys and values count one each), as
    MSGPackSerializer counts them, plus EXT_OBJECT_ITEMS for each object of a registered ext type (an empty
    DictionaryDHTValue: 23 bytes of msgpack, ~460 of memory); scalars alone count 0. Walked without recursion."""
    count, pending = 0, [obj]
    while pending:
        item = pending.pop()
        if isinstance(item, dict):
            count += 1 + 2 * len(item)
            pending.extend(x for pair in item.items() for x in pair if not isinstance(x, _SCALARS))
        elif isinstance(item, (list, tuple)):
            count += 1 + len(item)
            pending.extend(x for x in item if not isinstance(x, _SCALARS))
        elif not isinstance(item, _SCALARS):
            count += EXT_OBJECT_ITEMS
    return count


def decode_gather(payload: bytes) -> GatheredInfo:
    """Parse one member's gather payload; raises MalformedGatherError with the reason for anything else."""
    try:
        decoded = MSGPackSerializer.loads(payload)
    except Exception as e:
        raise MalformedGatherError(f"gather payload is not valid msgpack: {e}") from None
    if not isinstance(decoded, (list, tuple)) or len(decoded) != 3:
        raise MalformedGatherError(f"gather payload must be a list of 3 items, got {type(decoded).__name__}")
    bandwidth, mode, user_bytes = decoded
    if bandwidth is not None:
        if isinstance(bandwidth, bool) or not isinstance(bandwidth, (int, float)):
            raise MalformedGatherError(f"bandwidth must be a number or nil, got {type(bandwidth).__name__}")
        if not (math.isfinite(bandwidth) and bandwidth >= 0):
            raise MalformedGatherError(f"bandwidth must be finite and non-negative, got {bandwidth}")
        bandwidth = float(bandwidth)
    if isinstance(mode, bool) or not isinstance(mode, int) or not 0 <= mode < NUM_MODES:
        raise MalformedGatherError(f"mode must be 0 (node), 1 (client) or 2 (aux), got {mode!r}")
    if not isinstance(user_bytes, bytes):
        raise MalformedGatherError(f"the user object must be msgpack inside bin, got {type(user_bytes).__name__}")
    try:
        user_object = MSGPackSerializer.loads(user_bytes)
    except Exception as e:
        raise MalformedGatherError(f"the gathered user object is not valid msgpack: {e}") from None
    return GatheredInfo(bandwidth, mode, user_object, count_items(user_object))


def decode_group_gathered(
    peer_ids: Sequence[PeerID], gathered: Sequence[bytes]
) -> Tuple[Tuple[GatheredInfo, ...], Dict[PeerID, Any]]:
    """Decode every member's payload; returns them in group order and the user-facing {peer id: user object}.

    Raises MalformedGatherError for a malformed payload, and as soon as the user objects decoded so far hold more
    than MAX_GROUP_GATHER_ITEMS items (the rest are not decoded)."""
    if len(peer_ids) != len(gathered):
        raise MalformedGatherError(f"the group has {len(peer_ids)} members but {len(gathered)} gather payloads")
    infos, total_items = [], 0
    for peer_id, payload in zip(peer_ids, gathered):
        try:
            infos.append(decode_gather(payload))
        except MalformedGatherError as e:
            raise MalformedGatherError(f"peer {peer_id}: {e}") from None
        total_items += infos[-1].items
        if total_items > MAX_GROUP_GATHER_ITEMS:
            raise MalformedGatherError(
                f"the gathered objects of the group's first {len(infos)} of {len(peer_ids)} members hold more than "
                f"{MAX_GROUP_GATHER_ITEMS} items (lists, tuples, dicts and their elements; peer {peer_id}'s alone "
                f"{infos[-1].items}); refusing the group's gathered data"
            )
    return tuple(infos), {peer_id: info.user_object for peer_id, info in zip(peer_ids, infos)}
