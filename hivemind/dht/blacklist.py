"""Peers that recently failed to answer, skipped by searches for an exponentially growing time; a success clears it."""

import time
from collections import OrderedDict
from typing import Callable, Generic, Hashable, Tuple, TypeVar

PeerKey = TypeVar("PeerKey", bound=Hashable)

# peers remembered at most: find answers can name any number of made-up peers, each of which fails once; beyond this,
# the peers whose last failure is the oldest are forgotten (their backoff starts over if they fail again)
MAX_BLACKLIST_ENTRIES = 16384


class Blacklist(Generic[PeerKey]):
    """
    A peer that failed once is banned for ``base_time`` seconds, after n consecutive failures for
    ``base_time * backoff_rate ** (n - 1)`` seconds; any success forgets its failures. ``base_time=0`` disables it.

    :param clock: returns the current time in seconds; injectable for tests
    """

    def __init__(self, base_time: float = 5.0, backoff_rate: float = 2.0, clock: Callable[[], float] = time.monotonic):
        if base_time < 0 or backoff_rate < 1:
            raise ValueError(f"need base_time >= 0 and backoff_rate >= 1, got {base_time=}, {backoff_rate=}")
        self.base_time, self.backoff_rate, self.clock = base_time, backoff_rate, clock
        # peer -> (consecutive failures, banned until), ordered by last failure, oldest first
        self._banned: OrderedDict[PeerKey, Tuple[int, float]] = OrderedDict()

    def register_failure(self, peer: PeerKey) -> float:
        """Record one more failure of ``peer``; returns for how many seconds it is now banned."""
        if self.base_time == 0:
            return 0.0
        num_failures = self._banned.pop(peer, (0, 0.0))[0] + 1
        ban_time = self.base_time * self.backoff_rate ** (num_failures - 1)
        self._banned[peer] = (num_failures, self.clock() + ban_time)
        while len(self._banned) > MAX_BLACKLIST_ENTRIES:
            self._banned.popitem(last=False)
        return ban_time

    def register_success(self, peer: PeerKey) -> None:
        self._banned.pop(peer, None)

    def clear(self) -> None:
        """Forget every failure: no peer is banned, the next failure of any peer counts as its first."""
        self._banned.clear()

    def num_failures(self, peer: PeerKey) -> int:
        return self._banned.get(peer, (0, 0.0))[0]

    def __contains__(self, peer: PeerKey) -> bool:
        """Whether ``peer`` is banned right now (its failure count survives the ban until the next success)."""
        entry = self._banned.get(peer)
        return entry is not None and self.clock() < entry[1]

    def __len__(self) -> int:
        now = self.clock()
        return sum(1 for _, until in self._banned.values() if now < until)

    def __repr__(self) -> str:
        name, banned = self.__class__.__name__, len(self)
        return f"{name}(base_time={self.base_time}, backoff_rate={self.backoff_rate}, {banned=})"
