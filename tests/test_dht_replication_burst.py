"""A newcomer gets every key a neighbour should hand over, even more than one burst of its store rate limit."""

import asyncio

import pytest

from hivemind.dht.node import DHTNode
from hivemind.dht.rate_limit import DEFAULT_BURST_ITEMS, STORE_BYTES_PER_ITEM, decode_cost, store_item_cost
from hivemind.dht.replication import replication_batches
from hivemind.dht.routing import DHTID
from hivemind.dht.storage import DictionaryDHTValue
from hivemind.utils.serializer import MSGPackSerializer
from hivemind.utils.timed_storage import ValueWithExpiration, get_dht_time


def test_replication_batches_stay_small_and_keep_every_item():
    expiration = get_dht_time() + 60
    dictionary = DictionaryDHTValue()
    for index in range(300):
        dictionary.store(index, b"x", expiration)
    items = [(DHTID.generate(i), ValueWithExpiration(b"v", expiration)) for i in range(10000)]
    items.insert(5000, (DHTID.generate("dict"), ValueWithExpiration(dictionary, expiration)))
    batches = list(replication_batches(items, max_cost=4096, max_bytes=1 << 30))
    assert [item for batch, _ in batches for item in batch] == items
    assert all(cost <= 4096 for _, cost in batches)
    # one item each, plus their bytes (see rate_limit.decode_cost); the dictionary one, and each entry what the
    # receiver charges it, as a store item of its subkey and value, or its bytes where they cost more (as here)
    entries = sum(store_item_cost(MSGPackSerializer.dumps(index), b"x") - 1 for index in range(300))
    read = len(MSGPackSerializer.dumps(dictionary)) / STORE_BYTES_PER_ITEM
    assert read > entries
    assert sum(cost for _, cost in batches) == pytest.approx(
        10000 * (1 + decode_cost(b"\xc0") + decode_cost(b"v")) + 1 + 300 + read
    )


def test_replication_batches_stay_under_a_byte_budget():
    expiration = get_dht_time() + 60
    items = [(DHTID.generate(i), ValueWithExpiration(b"v" * 2000, expiration)) for i in range(3000)]
    items.append((DHTID.generate("huge"), ValueWithExpiration(b"h" * (3 << 20), expiration)))
    batches = [batch for batch, _ in replication_batches(items, max_cost=4096, max_bytes=1 << 20)]
    assert [item for batch in batches for item in batch] == items
    assert all(sum(len(item.value) for _, item in batch) <= 1 << 20 for batch in batches[:-1])
    assert [len(item.value) for _, item in batches[-1]] == [3 << 20]  # too big for any batch: sent alone


@pytest.mark.timeout(60)
async def test_newcomer_receives_more_keys_than_one_burst_of_the_store_rate_limit():
    holder = await DHTNode.create()
    newcomer = None
    try:
        num_keys = DEFAULT_BURST_ITEMS + 2000
        expiration = get_dht_time() + 300
        key_ids = [DHTID.generate(f"replicated_{index}") for index in range(num_keys)]
        for key_id in key_ids:
            holder.protocol.storage.store(key_id, b"\x01", expiration)
        newcomer = await DHTNode.create(initial_peers=await holder.get_visible_maddrs())
        # with only two nodes, the holder must hand every key over to the newcomer
        while len(newcomer.protocol.storage) < num_keys:
            await asyncio.sleep(0.1)
        assert newcomer.protocol.rejected["rate_limited"] == 0
        assert newcomer.node_id in holder.protocol.routing_table
    finally:
        await asyncio.gather(*(node.shutdown() for node in (holder, newcomer) if node is not None))


@pytest.mark.timeout(60)
async def test_newcomer_receives_more_bytes_than_one_request_may_carry():
    holder = await DHTNode.create()
    newcomer = None
    try:
        num_keys, value = 3000, MSGPackSerializer.dumps(b"x" * 2000)  # 6 MB: above the 4 MiB unary message limit
        expiration = get_dht_time() + 300
        for index in range(num_keys):
            holder.protocol.storage.store(DHTID.generate(f"large_{index}"), value, expiration)
        newcomer = await DHTNode.create(initial_peers=await holder.get_visible_maddrs())
        while len(newcomer.protocol.storage) < num_keys:
            await asyncio.sleep(0.1)
        assert newcomer.node_id in holder.protocol.routing_table  # a failed request would have dropped it
    finally:
        await asyncio.gather(*(node.shutdown() for node in (holder, newcomer) if node is not None))
