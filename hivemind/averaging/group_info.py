"""GroupInfo: who is in an assembled averaging group, in all-reduce order, and what each member gathered."""

from dataclasses import dataclass
from typing import Tuple

from hivemind.p2p import PeerID


@dataclass(frozen=True)
class GroupInfo:
    """An assembled group, identical on every member.

    :param group_id: random bytes chosen by the leader; names this group's all-reduce
    :param peer_ids: every member (the leader included) in the order that defines the all-reduce partition
    :param gathered: the gather payload sent by each member, aligned with ``peer_ids``
    """

    group_id: bytes
    peer_ids: Tuple[PeerID, ...]
    gathered: Tuple[bytes, ...]

    @property
    def group_size(self) -> int:
        return len(self.peer_ids)
