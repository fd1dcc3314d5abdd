"""When a get waits for a running search of the same key instead of starting its own (DHTNode's reuse_get_requests):
plain values, no network."""

import asyncio
import time

from hivemind.dht.node_get import REUSE_GET_TOLERANCE, PendingGet
from hivemind.dht.routing import DHTID
from hivemind.dht.search_state import KeySearch


def _running_search(sufficient_expiration_time: float = 100.0) -> PendingGet:
    future = asyncio.get_running_loop().create_future()
    return PendingGet(KeySearch(DHTID.generate("key"), sufficient_expiration_time), [future])


async def test_a_get_joins_a_recent_running_search_for_entries_as_fresh():
    pending = _running_search()
    assert pending.can_join(100.0, time.monotonic())
    assert pending.can_join(100.0 + REUSE_GET_TOLERANCE / 2, time.monotonic())


async def test_a_get_does_not_join_a_search_whose_waiters_all_left():
    # such a search stops at its next answer, before it is finished: a get joining it would get that early end
    pending = _running_search()
    pending.futures[0].cancel()
    assert not pending.can_join(100.0, time.monotonic())
    pending.futures.append(asyncio.get_running_loop().create_future())  # one waiter is still there: it runs on
    assert pending.can_join(100.0, time.monotonic())


async def test_a_get_does_not_join_a_finished_old_or_staler_search():
    finished = _running_search()
    finished.search.finished = True
    assert not finished.can_join(100.0, time.monotonic())
    old = _running_search()
    assert not old.can_join(100.0, time.monotonic() + 2 * REUSE_GET_TOLERANCE)
    staler = _running_search(sufficient_expiration_time=100.0)
    assert not staler.can_join(100.0 + 2 * REUSE_GET_TOLERANCE, time.monotonic())
