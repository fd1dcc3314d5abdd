"""
A get that starts after this node's store was acknowledged must not return an older entry, even when it joins a
search of the same key that started before the store (one node, concurrent callers; found by
benchmarks/chaos_dht.py's question "never an older value after a newer one was acknowledged").
"""

import asyncio
import os
import signal

import pytest

from hivemind.dht.node import DHTNode
from hivemind.dht.routing import DHTID
from hivemind.utils.timed_storage import get_dht_time
from tests.async_wait import wait_until
from tests.dht_swarm import shutdown_all
from tests.freeze import freeze

KEY = "progress"


@pytest.mark.timeout(30)
@pytest.mark.parametrize("subkey", [None, "entry"], ids=["plain", "subkey"])
async def test_get_after_acknowledged_store_sees_it_despite_a_running_search(subkey):
    # node ids chosen so that the two replicas of KEY are `holder` and `frozen`, and `writer` holds nothing itself
    key_id = DHTID.generate(source=KEY)
    options = dict(wait_timeout=1.5, num_replicas=2)
    holder = await DHTNode.create(node_id=DHTID(key_id ^ 1), **options)
    initial_peers = await holder.get_visible_maddrs()
    frozen = await DHTNode.create(node_id=DHTID(key_id ^ 2), initial_peers=initial_peers, **options)
    writer = await DHTNode.create(node_id=DHTID(key_id ^ 2**159), initial_peers=initial_peers, **options)
    try:
        assert await holder.store(KEY, "old", get_dht_time() + 60, subkey=subkey)
        freeze(frozen.p2p._daemon.pid)  # its answer to the first search comes after wait_timeout
        first = asyncio.create_task(writer.get(KEY, latest=True))
        await wait_until(
            lambda: any(p.search.best is not None for p in writer._pending_gets.get(key_id, ())),
            "the first search to find the old entry",
        )
        assert await writer.store(KEY, "new", get_dht_time() + 120, subkey=subkey, await_all_replicas=False)

        found = await writer.get(KEY, latest=True)  # starts after the store was acknowledged

        value = found.value if subkey is None else found.value[subkey].value
        assert value == "new", "a get that began after an acknowledged store returned the older entry"
        await first
    finally:
        os.kill(frozen.p2p._daemon.pid, signal.SIGCONT)
        await shutdown_all([writer, holder, frozen])
