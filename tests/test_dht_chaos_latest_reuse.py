"""
get(latest=True) joins a running search of the same key only if that search began at most REUSE_GET_TOLERANCE
earlier: a search held up by a frozen peer had found its entries before another peer's newer store was
acknowledged, and a later get(latest=True) that joined it returned the older entry (benchmarks/chaos_dht.py).
"""

import asyncio
import os
import signal
import time

import pytest

import hivemind.dht.node_get
from hivemind.dht.node import DHTNode
from hivemind.dht.routing import DHTID
from hivemind.utils.timed_storage import get_dht_time
from tests.async_wait import wait_until
from tests.dht_swarm import shutdown_all
from tests.freeze import freeze

KEY = "progress"


@pytest.mark.timeout(30)
async def test_latest_get_does_not_join_a_search_older_than_the_tolerance(monkeypatch):
    monkeypatch.setattr(hivemind.dht.node_get, "REUSE_GET_TOLERANCE", 0.2)
    # node ids chosen so that the two replicas of KEY are `holder` and `frozen`; `reader` and `writer` hold nothing
    key_id = DHTID.generate(source=KEY)
    options = dict(wait_timeout=2.0, num_replicas=2)
    holder = await DHTNode.create(node_id=DHTID(key_id ^ 1), **options)
    initial_peers = await holder.get_visible_maddrs()
    frozen = await DHTNode.create(node_id=DHTID(key_id ^ 2), initial_peers=initial_peers, **options)
    reader = await DHTNode.create(node_id=DHTID(key_id ^ 2**158), initial_peers=initial_peers, **options)
    writer = await DHTNode.create(node_id=DHTID(key_id ^ 2**159), initial_peers=initial_peers, **options)
    try:
        assert await writer.store(KEY, "old", get_dht_time() + 60)
        freeze(frozen.p2p._daemon.pid)  # the reader's first search waits for it until wait_timeout
        first = asyncio.create_task(reader.get(KEY, latest=True))
        started = time.monotonic()
        await wait_until(
            lambda: any(p.search.best is not None for p in reader._pending_gets.get(key_id, ())),
            "the first search to find the old entry",
        )
        assert await writer.store(KEY, "new", get_dht_time() + 120, await_all_replicas=False)
        await wait_until(lambda: time.monotonic() - started > 0.3, "the first search to be older than the tolerance")
        assert not first.done(), "the first search should still wait for the frozen replica"

        found = await reader.get(KEY, latest=True)

        assert found.value == "new", "get(latest=True) joined a search that began before the newer store"
        await first
    finally:
        os.kill(frozen.p2p._daemon.pid, signal.SIGCONT)
        await shutdown_all([writer, reader, holder, frozen])
