"""Local DHT storage: regular values, dictionary values (msgpack ext 0x50) and which incoming value wins."""

from __future__ import annotations

import heapq
import math
from typing import Dict, List, Optional, Tuple, Union

from hivemind.dht.dictionary_shares import DictionaryShares, Owner
from hivemind.dht.routing import DHTID, BinaryDHTValue, Subkey
from hivemind.utils.serializer import MSGPackSerializer
from hivemind.utils.timed_storage import DHTExpiration, TimedStorage, get_dht_time

__all__ = [
    "DictionaryDHTValue",
    "DHTLocalStorage",
    "CacheRefreshQueue",
    "MAX_DICTIONARY_ENTRIES",
    "MAX_DICTIONARY_BYTES",
    "MAX_ENCODED_DICTIONARY_BYTES",
]

# Per-key limits of a dictionary value in DHTLocalStorage (storage and cache): a find response (at most 4 MiB) must
# always be able to carry the whole dictionary, so that many small subkey stores cannot make a key unreadable.
# An entry beyond the limits is refused (reason "dictionary_full") unless it may push out an entry of a peer that holds
# more of the dictionary than its sender (see dictionary_shares.py); entries already stored stay readable.
MAX_DICTIONARY_ENTRIES = 8192
MAX_DICTIONARY_BYTES = 1024 * 1024  # the sum of encoded subkeys, values and ENTRY_OVERHEAD_BYTES per entry
ENTRY_OVERHEAD_BYTES = 16  # what an entry adds to the ext 0x50 encoding beside its subkey and value (at most 15)
# the ext 0x50 encoding of a dictionary within both limits is at most this long (headers, maxsize and latest expiration
# take at most 30 bytes): a whole dictionary sent to be stored that is longer could never be stored whole
MAX_ENCODED_DICTIONARY_BYTES = MAX_DICTIONARY_BYTES + 64
_MISSING = object()


@MSGPackSerializer.ext_serializable(0x50)
class DictionaryDHTValue(TimedStorage[Subkey, BinaryDHTValue]):
    """A dictionary value: subkey -> (serialized value, expiration), each entry expiring on its own."""

    latest_expiration_time = -math.inf  # the greatest expiration time ever stored here
    dropped_on_decode = 0  # entries of the decoded payload that were not kept (expired, or an older duplicate)

    def __init__(self, maxsize: Optional[Union[int, float]] = None):
        super().__init__(maxsize=maxsize)
        self._entry_nbytes: Dict[Subkey, int] = {}  # subkeys (a superset of the live ones) -> their size in bytes
        self._total_nbytes = 0  # the sum of _entry_nbytes
        # subkeys of entries whose size is computed only when needed (decoded ones), each to the subkey object held:
        # decoding a dictionary from a peer then costs no encoding of its subkeys (most decoded dictionaries are only
        # read, or merged entry by entry into another one)
        self._unsized: Dict[Subkey, Subkey] = {}

    # decoded_positions (set by unpackb only): each held subkey -> the index in the payload of the entry that brought
    # it, so that a reader can take the subkey's bytes from the payload instead of encoding it again
    decoded_positions: Optional[Dict[Subkey, int]] = None
    _shares: Optional[DictionaryShares] = None  # who stored each entry: made by the first store that names an owner
    _PRIVATE_STATE = TimedStorage._PRIVATE_STATE + (
        "_entry_nbytes",
        "_total_nbytes",
        "_unsized",
        "decoded_positions",
        "_shares",
    )

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._entry_nbytes, self._total_nbytes = {}, 0
        self._unsized = {subkey: subkey for subkey in self.data}
        self._shares = None

    def _get_shares(self) -> DictionaryShares:
        """The dictionary's shares, with the live entries it held before it had any recorded as unowned."""
        if self._shares is None:
            self._shares = DictionaryShares()
            for subkey in self.data:
                self._shares.record(subkey, None, 0)
        return self._shares

    @staticmethod
    def entry_nbytes(subkey: Subkey, value: BinaryDHTValue, subkey_nbytes: Optional[int] = None) -> int:
        """
        How many bytes an entry counts toward MAX_DICTIONARY_BYTES: encoded subkey, value and overhead. A caller that
        holds the subkey's encoding passes its length as ``subkey_nbytes`` (it must be at least the length of
        ``MSGPackSerializer.dumps(subkey)``), which saves encoding the subkey again.
        """
        if subkey_nbytes is None:
            subkey_nbytes = len(MSGPackSerializer.dumps(subkey))
        return subkey_nbytes + len(value) + ENTRY_OVERHEAD_BYTES

    def _size_of(self, subkey: Subkey) -> Optional[int]:
        """The counted size of a stored entry (computed now if it was stored unsized), None if there is none."""
        held = self._unsized.pop(subkey, _MISSING)
        if held is not _MISSING:
            item = self.data.get(subkey)
            if item is None:
                return None  # expired or evicted meanwhile
            nbytes = self._entry_nbytes[held] = self.entry_nbytes(held, item.value)
            self._total_nbytes += nbytes
            return nbytes
        return self._entry_nbytes.get(subkey)

    def _nbytes_if_stored(self, subkey: Subkey, value: BinaryDHTValue, subkey_nbytes: Optional[int] = None) -> int:
        """
        What the entry would count once stored. A replaced entry keeps the subkey object already held (a dict keeps
        its key), which may encode longer than the equal subkey given ((1.0,) * n == (1,) * n): counted as the longer.
        """
        nbytes = self.entry_nbytes(subkey, value, subkey_nbytes)
        replaced = self.data.get(subkey)
        if replaced is not None:
            replaced_nbytes = self._size_of(subkey)
            if replaced_nbytes is not None:
                nbytes = max(nbytes, replaced_nbytes - len(replaced.value) + len(value))
        return nbytes

    def store(
        self,
        key: Subkey,
        value: BinaryDHTValue,
        expiration_time: DHTExpiration,
        subkey_nbytes: Optional[int] = None,
        owner: Owner = None,
    ) -> bool:
        """
        Store an entry (see TimedStorage.store); ``subkey_nbytes``: the length of the encoded subkey, if known;
        ``owner``: the peer that stored it, for the fair shares of a full dictionary (see :meth:`make_room`).
        """
        nbytes = self._nbytes_if_stored(key, value, subkey_nbytes)
        if not super().store(key, value, expiration_time):
            return False
        self._unsized.pop(key, None)  # (left by a decoded entry evicted or expired since: this one is sized)
        self._total_nbytes += nbytes - self._entry_nbytes.get(key, 0)
        self._entry_nbytes[key] = nbytes
        if owner is not None or self._shares is not None:
            shares = self._get_shares()
            shares.record(key, owner, nbytes)
            if len(shares) > 2 * len(self.data) + 64:  # many recorded entries expired since: forget them
                shares.prune(self.data)
        if expiration_time > self.latest_expiration_time:
            self.latest_expiration_time = expiration_time
        return True

    def _store_unsized(self, key: Subkey, value: BinaryDHTValue, expiration_time: DHTExpiration) -> bool:
        """``store`` whose size accounting is left until needed (see _size_of): for entries being decoded."""
        if not super().store(key, value, expiration_time):
            return False
        self._total_nbytes -= self._entry_nbytes.pop(key, 0)
        self._unsized.setdefault(key, key)  # an equal subkey already held stays held (and counted when needed)
        if self._shares is not None:
            self._shares.record(key, None, 0)
        if expiration_time > self.latest_expiration_time:
            self.latest_expiration_time = expiration_time
        return True

    @property
    def nbytes(self) -> int:
        """The size of the live entries as counted toward MAX_DICTIONARY_BYTES."""
        for subkey in list(self._unsized):
            self._size_of(subkey)
        if len(self._entry_nbytes) != len(self):  # some entries expired or were evicted since
            for subkey in [subkey for subkey in self._entry_nbytes if subkey not in self.data]:
                self._total_nbytes -= self._entry_nbytes.pop(subkey)
        return self._total_nbytes

    def _excess(
        self, subkey: Subkey, value: BinaryDHTValue, subkey_nbytes: Optional[int] = None
    ) -> Tuple[int, int, int]:
        """
        (entries, bytes) by which storing this entry would take the dictionary past MAX_DICTIONARY_ENTRIES and
        MAX_DICTIONARY_BYTES (at most 0: within them), and the bytes the entry would count.
        """
        total_nbytes, replaced = self.nbytes, self.data.get(subkey)  # (nbytes first: it sizes every live entry)
        nbytes = self._nbytes_if_stored(subkey, value, subkey_nbytes)
        if replaced is None:
            return len(self.data) + 1 - MAX_DICTIONARY_ENTRIES, total_nbytes + nbytes - MAX_DICTIONARY_BYTES, nbytes
        return 0, total_nbytes - self._entry_nbytes[subkey] + nbytes - MAX_DICTIONARY_BYTES, nbytes

    def limit_exceeded_by(self, subkey: Subkey, value: BinaryDHTValue, subkey_nbytes: Optional[int] = None) -> bool:
        """Whether storing this entry would take the dictionary past MAX_DICTIONARY_ENTRIES or MAX_DICTIONARY_BYTES."""
        excess_entries, excess_nbytes, _ = self._excess(subkey, value, subkey_nbytes)
        return excess_entries > 0 or excess_nbytes > 0

    def make_room(
        self, subkey: Subkey, value: BinaryDHTValue, subkey_nbytes: Optional[int] = None, owner: Owner = None
    ) -> bool:
        """
        Whether the entry fits the limits, after pushing out entries of peers that hold more of this dictionary than
        ``owner`` will with it (see dictionary_shares.py): True if it fits now; False (nothing pushed out) if not.
        """
        excess_entries, excess_nbytes, nbytes = self._excess(subkey, value, subkey_nbytes)
        if excess_entries <= 0 and excess_nbytes <= 0:
            return True
        if owner is None:
            return False
        shares = self._get_shares()
        shares.prune(self.data)
        victims = shares.victims(owner, subkey, nbytes, excess_entries, excess_nbytes)
        if victims is None:
            return False
        for victim in victims:
            del self[victim]
            self._total_nbytes -= self._entry_nbytes.pop(victim)
            shares.forget(victim)
        return True

    def packb(self) -> bytes:
        """The ext 0x50 payload: [maxsize, latest_expiration_time, [[subkey, value, expiration], ...]]."""
        entries = [[subkey, item.value, float(item.expiration_time)] for subkey, item in self.items()]
        # maxsize as decoded or given: an int, or a float (+inf when unbounded), so that decoding round-trips
        return MSGPackSerializer.dumps([self.maxsize, float(self.latest_expiration_time), entries])

    @classmethod
    def unpackb(cls, raw: bytes) -> DictionaryDHTValue:
        """Parse an ext 0x50 payload (possibly from a remote peer: every field is checked, expired entries dropped)."""
        payload = MSGPackSerializer.loads(raw)
        if not isinstance(payload, list) or len(payload) != 3:
            raise ValueError(f"a DictionaryDHTValue is a 3-item array, got {type(payload).__name__} {payload!r:.100}")
        maxsize, latest_expiration_time, entries = payload
        if isinstance(maxsize, bool) or not isinstance(maxsize, (int, float)) or not maxsize >= 0:
            raise ValueError(f"DictionaryDHTValue maxsize must be a non-negative number or inf, got {maxsize!r:.100}")
        if isinstance(latest_expiration_time, bool) or not isinstance(latest_expiration_time, (int, float)):
            raise ValueError(f"DictionaryDHTValue expiration must be a number, got {latest_expiration_time!r:.100}")
        if not isinstance(entries, list):
            raise ValueError(f"DictionaryDHTValue entries must be an array, got {type(entries).__name__}")
        result = cls(maxsize=maxsize)  # kept as it is (an int, a float or inf) to be encoded back the same way
        positions: Dict[Subkey, int] = {}
        for index, entry in enumerate(entries):
            if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[1], bytes)):
                raise ValueError(f"a DictionaryDHTValue entry is [subkey, bytes, expiration], got {entry!r:.100}")
            subkey, value, expiration_time = entry
            if isinstance(expiration_time, bool) or not isinstance(expiration_time, (int, float)):
                raise ValueError(f"DictionaryDHTValue entry expiration must be a number, got {expiration_time!r:.100}")
            try:
                hash(subkey)
            except TypeError:
                raise ValueError(f"DictionaryDHTValue subkey must be hashable, got {subkey!r:.100}") from None
            if result._store_unsized(subkey, value, expiration_time):
                positions.setdefault(subkey, index)  # an equal subkey stored before stays held
            else:
                result.dropped_on_decode += 1
        result.decoded_positions = positions
        result.latest_expiration_time = max(result.latest_expiration_time, float(latest_expiration_time))
        return result

    def __repr__(self) -> str:
        return f"{type(self).__name__}({dict(self.items())}, latest_expiration_time={self.latest_expiration_time})"


class DHTLocalStorage(TimedStorage[DHTID, Union[BinaryDHTValue, DictionaryDHTValue]]):
    """
    A node's storage (or cache) of key id -> serialized value or DictionaryDHTValue. A dictionary is kept until its
    latest entry expires. ``store`` and ``store_subkey`` accept a value only if it has not expired and expires later
    than the entry (or subkey entry) it would replace.
    """

    def store(
        self,
        key: DHTID,
        value: Union[BinaryDHTValue, DictionaryDHTValue],
        expiration_time: DHTExpiration,
        subkey: Optional[Subkey] = None,
        owner: Owner = None,
    ) -> bool:
        """
        Store a regular value (``subkey=None``), one dictionary entry (``subkey`` given), or merge a whole
        DictionaryDHTValue entry by entry (then ``expiration_time`` is ignored; True only if every entry was accepted).
        ``owner``: the peer storing dictionary entries, for the fair shares of a full dictionary (see store_subkey).

        :returns: whether the entry was accepted; rejected entries leave the storage unchanged
        """
        if subkey is not None:  # one dictionary entry
            return self.store_subkey(key, subkey=subkey, value=value, expiration_time=expiration_time, owner=owner)
        if isinstance(value, DictionaryDHTValue):
            entries = list(value.items())  # live entries only: expired ones are not offered
            outcomes = [
                self.store_subkey(key, sub, item.value, item.expiration_time, owner=owner) for sub, item in entries
            ]
            return len(outcomes) > 0 and all(outcomes)  # storing nothing is not a success
        return super().store(key, value, expiration_time)  # replaces a regular value or a dictionary iff newer

    def store_subkey(
        self,
        key: DHTID,
        subkey: Subkey,
        value: BinaryDHTValue,
        expiration_time: DHTExpiration,
        subkey_nbytes: Optional[int] = None,
        owner: Owner = None,
    ) -> bool:
        """
        Store one dictionary entry: into the existing dictionary (if the subkey is absent or older there), or into a
        new dictionary replacing a regular value that expires strictly earlier (or no value at all). An entry that
        would take its dictionary past MAX_DICTIONARY_ENTRIES or MAX_DICTIONARY_BYTES is refused (see
        :meth:`dictionary_full`) unless ``owner`` (the peer storing it) holds less of the dictionary than another
        peer: then that peer's earliest stored entries make room (see DictionaryDHTValue.make_room).
        ``subkey_nbytes``: the length of the encoded subkey, if the caller has it.
        """
        if not expiration_time >= get_dht_time():  # also refuses NaN
            return False
        current = self.get(key)
        if current is not None and isinstance(current.value, DictionaryDHTValue):
            dictionary = current.value
            replaced = dictionary.data.get(subkey)  # (an expired one left there expires before expiration_time)
            if replaced is not None and replaced.expiration_time >= expiration_time:
                return False  # (before making room: the entry would not be stored)
            if not dictionary.make_room(subkey, value, subkey_nbytes, owner):
                return False
            if not dictionary.store(subkey, value, expiration_time, subkey_nbytes, owner):
                return False
            if expiration_time > current.expiration_time:
                super().store(key, dictionary, expiration_time)  # the dictionary now lives until its latest entry
            return True
        if self.dictionary_full(key, subkey, value, subkey_nbytes):
            return False
        if current is not None and expiration_time <= current.expiration_time:
            return False  # a regular value that lives at least as long wins
        dictionary = DictionaryDHTValue()
        dictionary.store(subkey, value, expiration_time, subkey_nbytes, owner)
        return super().store(key, dictionary, expiration_time)

    def dictionary_full(
        self, key: DHTID, subkey: Subkey, value: BinaryDHTValue, subkey_nbytes: Optional[int] = None
    ) -> bool:
        """Whether the entry is refused by the per-key limits: its dictionary (or the entry alone) would be too big."""
        current = self.get(key)
        if current is not None and isinstance(current.value, DictionaryDHTValue):
            return current.value.limit_exceeded_by(subkey, value, subkey_nbytes)
        return DictionaryDHTValue.entry_nbytes(subkey, value, subkey_nbytes) > MAX_DICTIONARY_BYTES


class CacheRefreshQueue:
    """
    Keys to re-fetch shortly before their cached copies expire (no I/O: the node pops due keys and fetches them).

    ``push(key, expiration_time)`` schedules a refresh at ``expiration_time - refresh_before_expiry`` (a key holds
    one slot: pushing it again reschedules it); ``pop_due(now)`` returns keys whose time has come, earliest first.
    """

    def __init__(self, refresh_before_expiry: float):
        self.refresh_before_expiry = refresh_before_expiry
        self._heap: List[Tuple[float, int, DHTID]] = []  # (refresh time, push number, key), with stale entries
        self._scheduled: Dict[DHTID, Tuple[float, int]] = {}  # key -> its live (refresh time, push number)
        self._pushes = 0

    def push(self, key: DHTID, expiration_time: DHTExpiration) -> None:
        self._pushes += 1
        entry = (expiration_time - self.refresh_before_expiry, self._pushes)
        self._scheduled[key] = entry
        heapq.heappush(self._heap, (*entry, key))

    def discard(self, key: DHTID) -> None:
        self._scheduled.pop(key, None)

    def next_refresh_time(self) -> Optional[float]:
        """When the earliest scheduled refresh is due, or None if nothing is scheduled."""
        while self._heap and self._scheduled.get(self._heap[0][2]) != self._heap[0][:2]:
            heapq.heappop(self._heap)  # a discarded or rescheduled key
        return self._heap[0][0] if self._heap else None

    def pop_due(self, now: Optional[float] = None, limit: Optional[int] = None) -> List[DHTID]:
        """Remove and return up to ``limit`` keys whose refresh time is <= ``now`` (default: get_dht_time())."""
        now = get_dht_time() if now is None else now
        due: List[DHTID] = []
        while limit is None or len(due) < limit:
            refresh_time = self.next_refresh_time()
            if refresh_time is None or refresh_time > now:
                break
            key = heapq.heappop(self._heap)[2]
            del self._scheduled[key]
            due.append(key)
        return due

    def __contains__(self, key: DHTID) -> bool:
        return key in self._scheduled

    def __len__(self) -> int:
        return len(self._scheduled)
