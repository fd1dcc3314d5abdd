"""
A dictionary that get returns carries the expiration of its latest entry, even when an entry was stored into this
node's copy while the search was running (the search kept a live reference to the stored dictionary, so the entry
appeared in the result under the older expiration of the dictionary as first found).
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

KEY = "scores"


@pytest.mark.timeout(30)
async def test_returned_dictionary_expires_with_its_latest_entry_despite_a_store_during_the_search():
    # node ids chosen so that the two replicas of KEY are `reader` and `frozen`; `writer` holds nothing itself
    key_id = DHTID.generate(source=KEY)
    options = dict(wait_timeout=1.5, num_replicas=2)
    reader = await DHTNode.create(node_id=DHTID(key_id ^ 1), **options)
    initial_peers = await reader.get_visible_maddrs()
    frozen = await DHTNode.create(node_id=DHTID(key_id ^ 2), initial_peers=initial_peers, **options)
    writer = await DHTNode.create(node_id=DHTID(key_id ^ 2**159), initial_peers=initial_peers, **options)
    try:
        assert await writer.store(KEY, "first", get_dht_time() + 60, subkey="a")
        freeze(frozen.p2p._daemon.pid)  # the reader's search waits for it until wait_timeout
        search = asyncio.create_task(reader.get(KEY, latest=True))
        await wait_until(lambda: key_id in reader._pending_gets or search.done(), "the reader's search to start")
        assert not search.done(), "the search should wait for the frozen replica"
        assert await writer.store(KEY, "second", get_dht_time() + 120, subkey="b", await_all_replicas=False)

        found = await search

        latest_entry = max(item.expiration_time for item in found.value.values())
        assert found.expiration_time == latest_entry, f"dictionary {found} expires before its latest entry"
    finally:
        os.kill(frozen.p2p._daemon.pid, signal.SIGCONT)
        await shutdown_all([writer, reader, frozen])
