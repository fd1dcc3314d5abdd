"""
Large dictionary subkeys: stored by every replica as hivemind 1.1.12 stores them, or, beyond the per-key dictionary
limit, refused by every replica with a warning on the storing peer that names the limit.
"""

import logging

import pytest
from dht_swarm import launch_swarm, shutdown_all

from hivemind.dht.routing import DHTID
from hivemind.dht.storage import MAX_DICTIONARY_BYTES, MAX_ENCODED_DICTIONARY_BYTES
from hivemind.utils.serializer import MSGPackSerializer
from hivemind.utils.timed_storage import get_dht_time


@pytest.mark.timeout(90)
async def test_a_subkey_over_64_kib_is_stored_by_every_replica():
    # a remote replica refused any subkey over 64 KiB while the storing peer kept it: store() said False, yet the
    # record was found (1.1.12 stores it everywhere and says True)
    nodes = await launch_swarm(3)
    try:
        subkey, expiration = "x" * 70000, get_dht_time() + 60
        assert await nodes[0].store("key", "big", expiration, subkey=subkey, exclude_self=True)
        assert await nodes[0].store("key", "big", expiration + 1, subkey=subkey)
        for node in nodes[1:]:
            found = await node.get("key", latest=True)
            assert found is not None and found.value[subkey].value == "big"
            assert found.value[subkey].expiration_time == expiration + 1
    finally:
        await shutdown_all(nodes)


@pytest.mark.timeout(90)
async def test_an_entry_beyond_the_dictionary_limit_is_refused_everywhere_with_a_warning(caplog):
    nodes = await launch_swarm(3)
    try:
        subkey, expiration = "y" * (MAX_DICTIONARY_BYTES + 1), get_dht_time() + 60
        with caplog.at_level(logging.WARNING):
            assert not await nodes[0].store("key", "huge", expiration, subkey=subkey)
        assert "MAX_DICTIONARY_BYTES" in caplog.text and "1048576" in caplog.text, caplog.text
        for node in nodes:
            assert await node.get("key", latest=True) is None
        caplog.clear()
        with caplog.at_level(logging.WARNING):  # an entry within the limit: no warning
            assert await nodes[0].store("key", "small", expiration, subkey="z" * 1000)
        assert "MAX_DICTIONARY_BYTES" not in caplog.text, caplog.text
    finally:
        await shutdown_all(nodes)


@pytest.mark.timeout(120)
async def test_equal_subkeys_that_encode_shorter_cannot_grow_a_dictionary_past_the_limit():
    # a replaced entry keeps the subkey object stored first: a remote peer stored (k, 1.0, 1.0, ...) then the equal
    # (k, 1, 1, ...), which counted 9 times less than the dictionary then encoded; repeated, the key's dictionary grew
    # to megabytes under a "1 MiB" count and no find response could carry it: the key was unreadable at that replica
    nodes = await launch_swarm(2)
    try:
        num_items, expiration = 40_000, get_dht_time() + 60  # 360 KB as floats, 40 KB as ints
        for index in range(24):
            long_subkey, short_subkey = (float(index),) + (1.0,) * num_items, (index,) + (1,) * num_items
            if not await nodes[0].store("key", index, expiration, subkey=long_subkey, exclude_self=True):
                break
            assert await nodes[0].store("key", index, expiration + 1, subkey=short_subkey, exclude_self=True)
        key_id = DHTID.generate(source="key")
        stored = nodes[1].protocol.storage.get(key_id)
        # the replica's find answer (nodes[0] itself may hold a cached copy, so it is asked directly)
        found = await nodes[0].protocol.call_find(nodes[1].peer_id, [key_id])
        assert found is not None, "the replica's find answer did not fit in a message"
        assert found[key_id][0] is not None and len(found[key_id][0].value) == len(stored.value) > 0
        assert len(MSGPackSerializer.dumps(stored.value)) <= MAX_ENCODED_DICTIONARY_BYTES
    finally:
        await shutdown_all(nodes)
