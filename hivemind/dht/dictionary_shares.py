"""
Who stored each entry of a dictionary value, so that a full dictionary is shared fairly among the peers storing in it
(see docs/security.md, "Dictionaries filled by one peer").

A replica caps a key's dictionary at MAX_DICTIONARY_ENTRIES / MAX_DICTIONARY_BYTES for all peers together. An entry
that arrives at a full dictionary may push out an entry of the peer holding the most entries (bytes) of it, if that
peer holds more than the new entry's sender will hold once it is stored (max-min fairness): one peer cannot fill a key
that other peers use so that their entries are refused, and it can never push out the entries of a peer holding fewer
than it. Entries stored without an owner (by local code, or cached from find results) are never pushed out.
"""

import heapq
import itertools
from typing import Dict, Hashable, Iterator, List, Optional, Tuple

Owner = Optional[Hashable]  # a peer id; None: unattributed (never pushed out, holds no share)
_MISSING = object()


class _Ranking:
    """Owner -> a positive amount, with the owner holding the largest found in O(log n) (a heap of lazy entries)."""

    def __init__(self):
        self.amounts: Dict[Hashable, int] = {}
        self._heap: List[Tuple[int, int, Hashable]] = []  # (-amount, push number, owner), stale ones included
        self._pushes = itertools.count()

    def add(self, owner: Hashable, delta: int) -> None:
        amount = self.amounts.get(owner, 0) + delta
        if amount > 0:
            self.amounts[owner] = amount
            heapq.heappush(self._heap, (-amount, next(self._pushes), owner))
        else:
            self.amounts.pop(owner, None)
        if len(self._heap) > 2 * len(self.amounts) + 64:  # too many stale entries: rebuild
            self._heap = [(-amount, next(self._pushes), owner) for owner, amount in self.amounts.items()]
            heapq.heapify(self._heap)

    def _is_live(self, entry: Tuple[int, int, Hashable]) -> bool:
        return self.amounts.get(entry[2]) == -entry[0]

    def top(self) -> Tuple[Owner, int]:
        """The owner holding the most and its amount; (None, 0) if none holds anything."""
        while self._heap and not self._is_live(self._heap[0]):
            heapq.heappop(self._heap)
        return (self._heap[0][2], -self._heap[0][0]) if self._heap else (None, 0)

    def above(self, threshold: int) -> Iterator[Hashable]:
        """Owners holding more than ``threshold``, each once: in time proportional to the heap entries above it."""
        seen, stack = set(), [0] if self._heap else []
        while stack:
            index = stack.pop()
            entry = self._heap[index]
            if -entry[0] <= threshold:
                continue  # nor anything below it in the heap
            if self._is_live(entry) and entry[2] not in seen:
                seen.add(entry[2])
                yield entry[2]
            stack.extend(child for child in (2 * index + 1, 2 * index + 2) if child < len(self._heap))


class DictionaryShares:
    """The owner of each entry of one dictionary, and how many entries and bytes each owner holds."""

    def __init__(self):
        self.owner_of: Dict[Hashable, Owner] = {}  # subkey -> who stored it
        # owner -> its subkeys (in store order) -> their nbytes
        self.held: Dict[Hashable, Dict[Hashable, int]] = {}
        self.counts, self.nbytes = _Ranking(), _Ranking()

    def __len__(self) -> int:
        return len(self.owner_of)

    def record(self, subkey: Hashable, owner: Owner, nbytes: int) -> None:
        """``subkey`` is now held by ``owner`` (a replaced entry's ownership moves to who replaced it)."""
        self.forget(subkey)
        self.owner_of[subkey] = owner
        if owner is not None:
            self.held.setdefault(owner, {})[subkey] = nbytes
            self.counts.add(owner, 1)
            self.nbytes.add(owner, nbytes)

    def forget(self, subkey: Hashable) -> None:
        owner = self.owner_of.pop(subkey, _MISSING)
        if owner is _MISSING or owner is None:
            return
        held = self.held[owner]
        nbytes = held.pop(subkey)
        if not held:
            del self.held[owner]
        self.counts.add(owner, -1)
        self.nbytes.add(owner, -nbytes)

    def prune(self, live: Dict[Hashable, object]) -> None:
        """
        Forget the entries that are no longer in ``live`` (expired). Every live entry must have been recorded (an
        entry stored without an owner is recorded with owner None), so that none is stale if the sizes match.
        """
        if len(self.owner_of) != len(live):
            for subkey in [subkey for subkey in self.owner_of if subkey not in live]:
                self.forget(subkey)

    def victims(
        self, sender: Owner, subkey: Hashable, nbytes: int, excess_entries: int, excess_nbytes: int
    ) -> Optional[List[Hashable]]:
        """
        The entries to push out so that ``sender``'s entry (``nbytes`` counted, under ``subkey``) fits, given by how
        much the dictionary would exceed its limits with it; None if it may not push out enough: an entry is pushed
        out only from an owner (not the sender) who, before losing it, holds more entries (or bytes, for the byte
        limit) than the sender will hold with its new entry; the one holding the most loses its earliest stored
        entry first. The entries' sizes must be recorded as they count (after :meth:`prune`).
        """
        if sender is None:
            return None
        replaced_owner = self.owner_of.get(subkey, _MISSING)
        lost: Dict[Hashable, Tuple[int, int]] = {}  # owner -> (entries, bytes) it would lose
        if replaced_owner is not _MISSING and replaced_owner is not None and replaced_owner != sender:
            lost[replaced_owner] = (1, self.held[replaced_owner][subkey])
        sender_replaced = self.held.get(sender, {}).get(subkey) if replaced_owner == sender else None
        sender_count = self.counts.amounts.get(sender, 0) + (0 if sender_replaced is not None else 1)
        sender_nbytes = self.nbytes.amounts.get(sender, 0) + nbytes - (sender_replaced or 0)
        chosen: List[Hashable] = []
        remaining: Dict[Hashable, Iterator[Tuple[Hashable, int]]] = {}

        def take_one(owner: Hashable) -> int:
            """Choose the earliest stored entry of ``owner`` not chosen yet (nor being replaced); its size."""
            entries = remaining.setdefault(owner, iter(self.held[owner].items()))  # (not changed meanwhile)
            for victim, victim_nbytes in entries:
                if victim != subkey:
                    chosen.append(victim)
                    count, total = lost.get(owner, (0, 0))
                    lost[owner] = (count + 1, total + victim_nbytes)
                    return victim_nbytes
            raise AssertionError("an owner's recorded entries ran out before its recorded count")

        if excess_entries > 0:  # a new subkey at a full dictionary: one entry of the owner holding the most
            owner, count = self.counts.top()
            if owner is None or owner == sender or count - lost.get(owner, (0, 0))[0] <= sender_count:
                return None
            excess_nbytes -= take_one(owner)
        if excess_nbytes > 0:
            candidates = []  # a heap of (-bytes held beyond those already chosen, order, owner)
            for order, owner in enumerate(self.nbytes.above(sender_nbytes)):
                left = self.nbytes.amounts[owner] - lost.get(owner, (0, 0))[1]
                if owner != sender and left > sender_nbytes:
                    candidates.append((-left, order, owner))
            heapq.heapify(candidates)
            while excess_nbytes > 0:
                if not candidates:
                    return None
                _, order, owner = heapq.heappop(candidates)
                excess_nbytes -= take_one(owner)
                left = self.nbytes.amounts[owner] - lost[owner][1]
                if left > sender_nbytes:
                    heapq.heappush(candidates, (-left, order, owner))
        return chosen
