"""traverse_dht with tens of thousands of queries at once (one DHT.get_many / store_many of many keys)."""

import asyncio
import time

import pytest

from hivemind.dht.routing import DHTID
from hivemind.dht.traverse import traverse_dht

pytestmark = pytest.mark.usefixtures("frozen_heap")  # CPU-time bounds: see conftest.frozen_heap


@pytest.mark.timeout(120)
def test_traverse_dht_of_30000_queries_is_not_quadratic():
    # a swarm of 3 nodes that every query knows: the scheduler's indices start with 30000 searches per node. Reading
    # them from the front while they left from the front scanned every deleted entry (quadratic: ~45 s here, ~1.5 s
    # now). Measured in CPU time of this thread, which other processes competing for the cores do not inflate
    nodes = [DHTID.generate() for _ in range(3)]
    calls = []

    async def get_neighbors(node, queries):
        calls.append(len(queries))
        await asyncio.sleep(0)
        return {query: (nodes, False) for query in queries}

    queries = [DHTID.generate() for _ in range(30000)]
    started = time.thread_time()
    nearest, visited = asyncio.run(
        traverse_dht(queries, nodes[:1], beam_size=20, num_workers=4, queries_per_call=16, get_neighbors=get_neighbors)
    )
    elapsed = time.thread_time() - started

    assert set(nearest) == set(queries) and all(sorted(found) == sorted(nodes) for found in nearest.values())
    assert all(visited[query] == set(nodes) for query in queries)
    assert sum(calls) == 3 * len(queries) and max(calls) == 16  # requests still carry 16 queries each
    assert elapsed < 8, f"traverse_dht of 30000 queries took {elapsed:.1f} s of CPU time"
