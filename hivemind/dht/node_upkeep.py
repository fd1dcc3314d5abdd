"""
The background loops of a DHTNode: refreshing cached values shortly before they expire, and looking up random ids in
routing-table buckets that saw no traffic for a while. An error in one round is logged and the loop goes on with the
next round; only cancellation (by the node's shutdown) ends a loop.
"""

import asyncio
import random
from typing import TYPE_CHECKING

from hivemind.dht.routing import DHTID
from hivemind.utils.asyncio import await_with_timeout
from hivemind.utils.logging import get_logger
from hivemind.utils.timed_storage import get_dht_time

if TYPE_CHECKING:
    from hivemind.dht.node import DHTNode

logger = get_logger(__name__)

CACHE_REFRESH_RETRY_DELAY = 1.0  # s: pause after a failed cache refresh round, so that a persistent error cannot spin


async def refresh_cache_forever(node: "DHTNode") -> None:
    """Re-fetch keys that were served from the node's cache shortly before their cached copies expire."""
    while True:
        try:
            await _refresh_due_cache_entries(node)
        except Exception as e:
            logger.warning(f"Cache refresh failed (retrying in {CACHE_REFRESH_RETRY_DELAY} s): {e!r}", exc_info=True)
            await asyncio.sleep(CACHE_REFRESH_RETRY_DELAY)


async def _refresh_due_cache_entries(node: "DHTNode") -> None:
    """Wait until the earliest scheduled refresh is due (or a new one is scheduled), then run those that are due."""
    next_time = node.cache_refresh_queue.next_refresh_time()
    node._cache_refresh_wakeup.clear()
    delay = None if next_time is None else max(0.0, next_time - get_dht_time())
    try:
        await await_with_timeout(node._cache_refresh_wakeup.wait(), delay)
        return  # something new was scheduled: recompute the earliest time
    except asyncio.TimeoutError:
        pass
    due = node.cache_refresh_queue.pop_due(get_dht_time(), node.chunk_size)
    fresher_than = {}
    for key_id in due:
        cached = node.protocol.cache.get(key_id)
        if cached is not None:
            fresher_than[key_id] = cached.expiration_time
    if fresher_than:
        await node.get_many_by_id(
            list(fresher_than), sufficient_expiration_time=max(fresher_than.values()) + 1e-6, _is_refresh=True
        )


async def refresh_stale_buckets_forever(node: "DHTNode", refresh_timeout: float) -> None:
    """Every ``refresh_timeout`` seconds, look up a random id in each bucket not updated for that long."""
    while True:
        await asyncio.sleep(refresh_timeout)
        try:
            await _refresh_stale_buckets(node, refresh_timeout)
        except Exception as e:
            logger.warning(f"Bucket refresh failed (next try in {refresh_timeout} s): {e!r}", exc_info=True)


async def _refresh_stale_buckets(node: "DHTNode", refresh_timeout: float) -> None:
    now = get_dht_time()
    stale = [bucket for bucket in node.protocol.routing_table.buckets if now - bucket.last_updated > refresh_timeout]
    if stale:
        queries = [DHTID(random.randrange(bucket.lower, bucket.upper)) for bucket in stale]
        await node.find_nearest_nodes(queries)
        for bucket in stale:
            bucket.last_updated = get_dht_time()
