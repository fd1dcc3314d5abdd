"""Looking again, in the network, at grid prefixes that this DHT node remembers as empty (negative caching).

Beam search stores a ``None`` entry under a prefix it found empty, for ``cache_expiration`` seconds (300 by default),
and the searching node keeps that entry in its local cache. A local entry that has not expired satisfies the node's
later look-ups of the prefix without asking the network, so a server that announces experts under the prefix
afterwards (typically one that restarted after its announcements had expired) stayed invisible to this node for the
rest of those 300 s, while the prefix's nearest nodes already held the new announcements beside the ``None``.

Here a prefix whose answer holds only such entries is looked up in the network again (visiting its nearest nodes,
whose copies merge with the local one) at most once per ``NEGATIVE_RECHECK_PERIOD`` seconds per node. The search
does not wait for that look-up (a frozen peer among the nearest nodes would hold it for the DHT's RPC timeout): it
runs in the DHT node, which owns it, and a later search of the prefix uses what it found until the next look-up.
"""

from __future__ import annotations

import asyncio
import math
import time
import weakref
from typing import Callable, Dict, Optional

from hivemind.dht import DHTNode
from hivemind.utils.timed_storage import ValueWithExpiration, get_dht_time

__all__ = ["NEGATIVE_RECHECK_PERIOD", "recheck_negative_prefixes"]

NEGATIVE_RECHECK_PERIOD = 10.0  # seconds between two network look-ups of one prefix remembered as empty
MAX_REMEMBERED_PREFIXES = 4096  # above this many, what earlier look-ups found is forgotten (looked up again)


class _Rechecks:
    """One node's prefixes remembered as empty: when each was last looked up in the network, the look-ups still
    running, and what the last finished one found."""

    def __init__(self):
        self.checked_at: Dict[str, float] = {}
        self.running: Dict[str, asyncio.Future] = {}
        self.found: Dict[str, Optional[ValueWithExpiration]] = {}

    def collect(self, prefix: str) -> None:
        running = self.running.get(prefix)
        if running is not None and running.done():
            del self.running[prefix]
            if not running.cancelled() and running.exception() is None:
                self.found[prefix] = running.result()

    def forget_all(self) -> None:
        for running in self.running.values():
            running.cancel()  # stops that key's search in the node
        self.checked_at.clear(), self.running.clear(), self.found.clear()


_rechecks: weakref.WeakKeyDictionary[DHTNode, _Rechecks] = weakref.WeakKeyDictionary()


def _unexpired(found: Optional[ValueWithExpiration]) -> Optional[ValueWithExpiration]:
    """A remembered dictionary value without the entries that expired since it was found."""
    if found is None or not isinstance(found.value, dict):
        return found
    now = get_dht_time()
    entries = {key: entry for key, entry in found.value.items() if getattr(entry, "expiration_time", now) > now}
    return ValueWithExpiration(entries, found.expiration_time) if entries else None


async def recheck_negative_prefixes(
    node: DHTNode,
    found: Dict[str, Optional[ValueWithExpiration]],
    is_empty: Callable[[str, ValueWithExpiration], bool],
    num_workers: Optional[int] = None,
) -> Dict[str, Optional[ValueWithExpiration]]:
    """``found`` (a ``get_many`` result) where each prefix whose value ``is_empty`` (only negative-cache or invalid
    entries) is replaced by what the last network look-up of it found; starts a look-up where the last one is older
    than the period."""
    empty = [prefix for prefix, value in found.items() if value is not None and is_empty(prefix, value)]
    if not empty:
        return found
    memory = _rechecks.setdefault(node, _Rechecks())
    now = time.monotonic()
    for prefix in empty:
        memory.collect(prefix)
    due = [
        prefix
        for prefix in empty
        if prefix not in memory.running and now - memory.checked_at.get(prefix, -math.inf) >= NEGATIVE_RECHECK_PERIOD
    ]
    if due:
        if len(memory.checked_at) + len(due) > MAX_REMEMBERED_PREFIXES:
            memory.forget_all()
        # an infinite sufficient expiration: no entry ends the search early, so the nearest nodes are all asked
        futures = await node.get_many(
            due, sufficient_expiration_time=math.inf, num_workers=num_workers, return_futures=True
        )
        for prefix in due:
            memory.checked_at[prefix], memory.running[prefix] = now, futures[prefix]
            futures[prefix].add_done_callback(_retrieve_exception)
    result = dict(found)
    for prefix in empty:
        remembered = _unexpired(memory.found.get(prefix))
        if remembered is not None:
            result[prefix] = remembered
    return result


def _retrieve_exception(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()  # a failed look-up is simply retried after the period (no "never retrieved" warning)
