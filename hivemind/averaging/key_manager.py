"""Group keys in the DHT: where averagers announce that they look for a group, and how the key's bits evolve."""

import math
import random
import re
from typing import List, Optional, Tuple

from hivemind.averaging.group_info import GroupInfo
from hivemind.dht import DHT
from hivemind.p2p import PeerID
from hivemind.utils.logging import get_logger
from hivemind.utils.timed_storage import DHTExpiration

logger = get_logger(__name__)

GROUP_PATTERN = re.compile(r"^[^.]+\.0b[01]*$")  # "<prefix>.0b<bits>", the prefix has no dots
GroupKey = str
MAX_PEER_ID_BYTES = 128  # libp2p peer ids are multihashes: 38 bytes for inlined ed25519 keys, 34 for sha2-256


def is_valid_group(maybe_group: object) -> bool:
    """Whether ``maybe_group`` is a well-formed group key such as ``"myprefix.0b0110"``."""
    return isinstance(maybe_group, str) and GROUP_PATTERN.fullmatch(maybe_group) is not None


def _num_buckets(group_size: int, target_group_size: Optional[int]) -> int:
    """How many buckets the new bits choose from: the target size, or the next power of two for an open size."""
    if target_group_size is not None and target_group_size >= group_size:
        return target_group_size
    return 1 << max(0, (group_size - 1).bit_length())


def next_group_bits(
    group_bits: str, group_id: bytes, index: int, group_size: int, target_group_size: Optional[int]
) -> str:
    """The bits a group member moves to after its group was assembled (Moshpit-style re-shuffling).

    Every member seeds CPython's Mersenne Twister with the group id, so all of them draw the same permutation of
    bucket numbers; member ``index`` (its position in the group's order) takes the ``index``-th bucket, writes it
    in binary and shifts it into its bits from the right. Members of one group thus land in different buckets.
    Empty bits stay empty (no re-shuffling without bits).
    """
    if not group_bits:
        return group_bits
    if not 0 <= index < group_size:
        raise ValueError(f"member index {index} is outside a group of {group_size}")
    num_buckets = _num_buckets(group_size, target_group_size)
    bucket = random.Random(group_id).sample(range(num_buckets), group_size)[index]
    num_digits = math.ceil(math.log2(num_buckets)) if num_buckets > 1 else 0
    new_bits = format(bucket, "b").rjust(num_digits, "0")
    return (group_bits + new_bits)[-len(group_bits) :]


class GroupKeyManager:
    """Declares this averager under its current group key and reads who else is there.

    The key is ``<prefix>.0b<group_bits>``; each entry maps a raw peer id (subkey) to ``True`` while that peer looks
    for a group, or ``False`` once it left.

    :param dht: a running DHT (calls go through its process)
    :param prefix: averaging namespace, without dots
    :param initial_group_bits: a string of 0/1 appended to the key; empty (default) keeps one key for everyone
    :param target_group_size: the group size the averager aims for (drives how many bits change per round)
    :param peer_id: this averager's peer id (default: the DHT's)
    """

    def __init__(
        self,
        dht: DHT,
        prefix: str,
        initial_group_bits: str = "",
        target_group_size: Optional[int] = None,
        peer_id: Optional[PeerID] = None,
    ):
        if not is_valid_group(f"{prefix}.0b{initial_group_bits}"):
            raise ValueError(
                f"prefix {prefix!r} and group bits {initial_group_bits!r} do not form a valid group key: the prefix "
                "must be non-empty without dots, the bits a string of 0 and 1"
            )
        self.dht, self.prefix, self.target_group_size = dht, prefix, target_group_size
        self._group_bits = initial_group_bits
        self._peer_id = peer_id

    @property
    def peer_id(self) -> PeerID:
        if self._peer_id is None:
            self._peer_id = self.dht.peer_id
        return self._peer_id

    @property
    def current_key(self) -> GroupKey:
        return f"{self.prefix}.0b{self._group_bits}"

    @property
    def group_bits(self) -> str:
        return self._group_bits

    @group_bits.setter
    def group_bits(self, group_bits: str) -> None:
        if not isinstance(group_bits, str) or not is_valid_group(f"{self.prefix}.0b{group_bits}"):
            raise ValueError(f"group bits must be a string of 0 and 1, got {group_bits!r}")
        self._group_bits = group_bits

    async def declare_averager(
        self, group_key: GroupKey, peer_id: PeerID, expiration_time: DHTExpiration, looking_for_group: bool = True
    ) -> bool:
        """Announce (``True``) or withdraw (``False``) ``peer_id`` under ``group_key``; returns whether it was stored.

        Withdrawing passes the expiration of the announcement: the ``False`` entry is stored with the next float
        above it, so that it replaces the ``True`` entry everywhere (an equal expiration would be refused).
        """
        if not is_valid_group(group_key):
            raise ValueError(f"not a valid group key: {group_key!r}")
        if not looking_for_group:
            expiration_time = math.nextafter(float(expiration_time), math.inf)
        return await self.dht.store(
            key=group_key,
            subkey=peer_id.to_bytes(),
            value=bool(looking_for_group),
            expiration_time=float(expiration_time),
            return_future=True,
        )

    async def get_averagers(self, group_key: str, only_active: bool) -> List[Tuple[PeerID, float]]:
        """Peers declared under ``group_key`` with their expirations; ``only_active`` keeps those still looking.

        Entries that are not a (raw peer id bytes -> bool) pair with a finite expiration are skipped.
        """
        if not is_valid_group(group_key):
            raise ValueError(f"not a valid group key: {group_key!r}")
        found = await self.dht.get(group_key, latest=True, return_future=True)
        if found is None or not isinstance(found.value, dict):
            return []
        averagers = []
        skipped = 0
        for subkey, entry in found.value.items():
            value, expiration = getattr(entry, "value", None), getattr(entry, "expiration_time", None)
            well_formed = (
                isinstance(subkey, bytes)
                and 0 < len(subkey) <= MAX_PEER_ID_BYTES
                and isinstance(value, bool)
                and isinstance(expiration, float)
                and math.isfinite(expiration)
            )
            if not well_formed:
                skipped += 1
                continue
            if value or not only_active:
                averagers.append((PeerID(subkey), expiration))
        if skipped:
            logger.debug(f"Skipped {skipped} malformed entries under {group_key}")
        return averagers

    async def update_key_on_group_assembled(self, group_info: GroupInfo) -> None:
        """Move to the bits for the next round (this peer must be a member of ``group_info``)."""
        position = group_info.peer_ids.index(self.peer_id)
        self.group_bits = next_group_bits(
            self._group_bits, group_info.group_id, position, group_info.group_size, self.target_group_size
        )
