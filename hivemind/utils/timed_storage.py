"""A dictionary whose entries expire at given DHT times."""

from __future__ import annotations

import heapq
import itertools
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Dict, Generic, Iterator, List, Optional, Tuple, TypeVar

__all__ = [
    "DHTExpiration",
    "MAX_DHT_TIME_DISCREPANCY_SECONDS",
    "get_dht_time",
    "ValueWithExpiration",
    "TimedStorage",
    "HeapEntry",
]

KeyType = TypeVar("KeyType")
ValueType = TypeVar("ValueType")
DHTExpiration = float
MAX_DHT_TIME_DISCREPANCY_SECONDS = 3  # peers whose clocks differ by more than this are refused at bootstrap

get_dht_time = time.time  # a DHT time is an absolute Unix time in seconds


@dataclass(frozen=True)
class ValueWithExpiration(Generic[ValueType]):
    """A value with its expiration time; behaves like the tuple ``(value, expiration_time)``."""

    value: ValueType
    expiration_time: DHTExpiration

    def _as_tuple(self) -> Tuple[ValueType, DHTExpiration]:
        return self.value, self.expiration_time

    def __iter__(self) -> Iterator:
        return iter(self._as_tuple())

    def __getitem__(self, index):
        return self._as_tuple()[index]

    def __len__(self):
        return 2

    def __eq__(self, other):
        if isinstance(other, ValueWithExpiration):
            return self.value == other.value and self.expiration_time == other.expiration_time
        if isinstance(other, tuple):
            return self._as_tuple() == other
        return NotImplemented

    def __hash__(self):
        return hash(self._as_tuple())


@dataclass(frozen=True, order=True)
class HeapEntry(Generic[KeyType]):
    """A key with its expiration time, ordered by expiration time first (then by key), e.g. for a heap of keys
    that expire. Kept for code written for hivemind 1.1: TimedStorage breaks ties by insertion order instead, so
    that its keys need not be comparable."""

    expiration_time: DHTExpiration
    key: KeyType


_HeapEntry = Tuple[DHTExpiration, int, KeyType]  # (expiration, insertion counter, key): keys are never compared


class TimedStorage(Generic[KeyType, ValueType]):
    """A dictionary that keeps each value until its expiration time, at most ``maxsize`` entries.

    Expired entries are dropped lazily on every access; when the storage is full, the entry that expires first is
    evicted. :meth:`freeze` suspends the removal of expired entries, e.g. while iterating or serializing.
    """

    def __init__(self, maxsize: Optional[int] = None):
        if maxsize is not None and maxsize < 0:
            raise ValueError(f"maxsize must be non-negative or None, got {maxsize}")
        self.maxsize = maxsize if maxsize is not None else float("inf")
        self.data: Dict[KeyType, ValueWithExpiration[ValueType]] = {}
        self.expiration_heap: List[_HeapEntry] = []
        self.key_to_heap: Dict[KeyType, _HeapEntry] = {}
        self._counter = itertools.count()
        self._frozen_depth = 0
        self._frozen_by_flag = False  # storage.frozen = True (as hivemind 1.1.12 allows), until set to False

    @property
    def is_frozen(self) -> bool:
        return self._frozen_depth > 0 or self._frozen_by_flag

    @property
    def frozen(self) -> bool:
        """Whether expired entries are kept for now (inside ``with storage.freeze():``, or after ``frozen = True``)."""
        return self.is_frozen

    @frozen.setter
    def frozen(self, value: bool) -> None:
        self._frozen_by_flag = bool(value)

    def _remove_outdated(self) -> None:
        if self.is_frozen:
            return
        now = get_dht_time()
        while self.expiration_heap:
            top = self.expiration_heap[0]
            expiration_time, _, key = top
            if self.key_to_heap.get(key) is not top:  # stale heap entry of a replaced or deleted key
                heapq.heappop(self.expiration_heap)
                continue
            if expiration_time >= now and len(self.data) <= self.maxsize:
                break
            heapq.heappop(self.expiration_heap)
            del self.data[key], self.key_to_heap[key]
        if len(self.expiration_heap) > 2 * len(self.data) + 64:  # too many stale entries: rebuild
            self.expiration_heap = list(self.key_to_heap.values())
            heapq.heapify(self.expiration_heap)

    def store(self, key: KeyType, value: ValueType, expiration_time: DHTExpiration) -> bool:
        """Store ``value`` under ``key`` until ``expiration_time``.

        Returns False (and stores nothing) if ``expiration_time`` is already in the past, or if ``key`` holds an
        entry that expires at the same time or later; returns True otherwise.
        """
        if not expiration_time >= get_dht_time():  # also refuses NaN
            return False
        self._remove_outdated()
        existing = self.data.get(key)
        if existing is not None and existing.expiration_time >= expiration_time:
            return False
        heap_entry = (expiration_time, next(self._counter), key)
        self.data[key] = ValueWithExpiration(value, expiration_time)
        self.key_to_heap[key] = heap_entry
        heapq.heappush(self.expiration_heap, heap_entry)
        self._remove_outdated()  # evicts the earliest-expiring entry if over capacity (maybe this one)
        return key in self.data and self.key_to_heap[key] is heap_entry

    def get(self, key: KeyType) -> Optional[ValueWithExpiration[ValueType]]:
        """The ``(value, expiration_time)`` stored under key, or None if absent or expired."""
        self._remove_outdated()
        return self.data.get(key)

    def items(self) -> Iterator[Tuple[KeyType, ValueWithExpiration[ValueType]]]:
        """Iterate over ``(key, ValueWithExpiration)`` of all live entries."""
        self._remove_outdated()
        return ((key, value) for key, value in list(self.data.items()))

    def top(self) -> Tuple[Optional[KeyType], Optional[ValueWithExpiration[ValueType]]]:
        """The entry that expires first as ``(key, ValueWithExpiration)``, or ``(None, None)`` if empty."""
        self._remove_outdated()
        while self.expiration_heap:
            top = self.expiration_heap[0]
            key = top[2]
            if self.key_to_heap.get(key) is top:
                return key, self.data[key]
            heapq.heappop(self.expiration_heap)
        return None, None

    def clear(self) -> None:
        self.data.clear()
        self.key_to_heap.clear()
        self.expiration_heap.clear()

    def __contains__(self, key: KeyType) -> bool:
        self._remove_outdated()
        return key in self.data

    def __len__(self) -> int:
        self._remove_outdated()
        return len(self.data)

    def __delitem__(self, key: KeyType) -> None:
        if key not in self.data:
            raise KeyError(key)
        del self.data[key], self.key_to_heap[key]  # the heap entry becomes stale and is skipped later

    def __bool__(self) -> bool:
        return len(self) > 0

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self.data})"

    _PRIVATE_STATE = ("_counter", "_frozen_depth", "_frozen_by_flag", "data", "expiration_heap", "key_to_heap")

    def __getstate__(self) -> dict:
        # hivemind 1.1.12's layout, so that either version unpickles what the other wrote: its heap holds HeapEntry
        state = {key: value for key, value in self.__dict__.items() if key not in self._PRIVATE_STATE}
        state["data"] = dict(self.data)
        state["key_to_heap"] = {key: HeapEntry(entry[0], key) for key, entry in self.key_to_heap.items()}
        try:  # a heap in 1.1.12's order (expiration time, then key)
            state["expiration_heap"] = sorted(state["key_to_heap"].values())
        except TypeError:  # keys that do not compare: our order (1.1.12 could not have stored them either)
            state["expiration_heap"] = sorted(state["key_to_heap"].values(), key=lambda e: self.key_to_heap[e.key])
        if self._frozen_by_flag:
            state["frozen"] = True
        return state

    def __setstate__(self, state: dict) -> None:
        state = dict(state)
        data, frozen = state.pop("data", {}), bool(state.pop("frozen", False) or state.get("_frozen_by_flag"))
        for key in self._PRIVATE_STATE:
            state.pop(key, None)
        self.__dict__.update(state)
        TimedStorage.__init__(self, maxsize=state.get("maxsize"))
        self._frozen_by_flag = frozen
        for key, item in data.items():  # in their order, as stored, even if expired: access drops them as usual
            self.data[key] = ValueWithExpiration(*item)
        for key in sorted(self.data, key=lambda key: self.data[key].expiration_time):
            heap_entry = (self.data[key].expiration_time, next(self._counter), key)
            self.key_to_heap[key] = heap_entry
            self.expiration_heap.append(heap_entry)  # appended in sorted order: a valid heap

    @contextmanager
    def freeze(self):
        """Within this context, expired entries are neither removed nor hidden and capacity is not enforced;
        storing an entry whose expiration time is already past is still refused."""
        self._frozen_depth += 1
        try:
            yield self
        finally:
            self._frozen_depth -= 1
