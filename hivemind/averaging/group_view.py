"""A digest of how one member sees its group's all-reduce: who is in it, in which order and mode, and which part of
the vector each member reduces.

Members compute the same partition only if the leader told all of them the same group. A leader that tells members
different orders (or different gathered bandwidths) makes them exchange parts of equal sizes but of different
positions: every size check passes and the averages silently mix unrelated elements. A sender therefore puts this
digest in the (otherwise unused) ``peer_id`` field of its first ``AveragingData``, and a reducer refuses a sender
whose digest differs from its own. Peers that leave the field empty (the original implementation) are not checked.
"""

import hashlib
import math
import struct
from typing import Optional

__all__ = ["GROUP_VIEW_DIGEST_BYTES", "group_view_digest", "first_part_refusal"]

GROUP_VIEW_DIGEST_BYTES = 16


def group_view_digest(runner) -> bytes:
    """16 bytes that differ (but for a hash collision) between two different views of the same group's round.

    :param runner: an AllReduceRunner (its ``ordered_peer_ids``, ``modes`` and ``container.parts`` are read)
    """
    parts = runner.container.parts
    digest = hashlib.blake2b(digest_size=GROUP_VIEW_DIGEST_BYTES)
    for peer_id, mode in zip(runner.ordered_peer_ids, runner.modes):
        raw = peer_id.to_bytes()
        digest.update(struct.pack("<IB", len(raw), mode.value) + raw)
    digest.update(struct.pack("<I", len(parts)))
    for part in parts:
        digest.update(struct.pack("<IQQI", part.tensor_index, part.start, part.stop, part.reducer))
    return digest.digest()


def first_part_refusal(first, own_view: bytes) -> Optional[str]:
    """Why a sender's first ``AveragingData`` must be refused (its weight, or a view of the group other than
    ``own_view``), or None. An empty ``peer_id`` (the original implementation sends none) is not checked."""
    if not (math.isfinite(first.weight) and first.weight >= 0):
        return f"weight {first.weight} is not a finite non-negative number"
    if first.peer_id and first.peer_id != own_view:
        return (
            "its leader told it another group order or partition than ours (the leader sent members different groups)"
        )
    return None
