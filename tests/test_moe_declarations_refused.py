"""A server whose announcements the DHT refuses (here: a prefix dictionary already holding the most entries a DHT node
keeps, as a peer flooding it with garbage can make it) says so in its log: its experts stay invisible to beam search,
and it said nothing."""

import time

import pytest

from hivemind.dht import DHT
from hivemind.dht.storage import MAX_DICTIONARY_ENTRIES
from hivemind.moe.server.dht_handler import DHTHandlerThread
from hivemind.utils.timed_storage import get_dht_time


async def _fill_prefix(_dht, node, prefix: str = "ffn.0.", count: int = MAX_DICTIONARY_ENTRIES):
    subkeys = list(range(1000, 1000 + count))
    expiration = get_dht_time() + 600
    return await node.store_many([prefix] * count, [b"garbage"] * count, expiration, subkeys=subkeys)


@pytest.mark.timeout(60)
def test_refused_announcements_are_logged(caplog):
    dht = DHT(start=True)
    try:
        stored = dht.run_coroutine(_fill_prefix)
        assert all(stored.values())
        thread = DHTHandlerThread({"ffn.0.5": None, "ffn.1.2": None}, dht, update_period=30)
        with caplog.at_level("WARNING"):
            thread.start()
            deadline = time.monotonic() + 20
            while "announcements" not in caplog.text and time.monotonic() < deadline:
                time.sleep(0.1)
            thread.shutdown(timeout=10)
        assert "refused 1 of" in caplog.text and "'ffn.0.'" in caplog.text, caplog.text
    finally:
        dht.shutdown()
