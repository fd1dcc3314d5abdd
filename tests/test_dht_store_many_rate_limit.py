"""store_many to a replica of ours stays within that replica's store rate limit, which refuses a request whole."""

import random

import pytest
from dht_swarm import launch_swarm, shutdown_all

from hivemind.dht.routing import DHTID
from hivemind.utils.serializer import MSGPackSerializer
from hivemind.utils.timed_storage import get_dht_time


async def _store_and_check(keys, values):
    nodes = await launch_swarm(2)
    try:
        stored = await nodes[0].store_many(keys, values, get_dht_time() + 300, exclude_self=True)
        assert sum(stored.values()) == len(keys)  # the only replica is the other peer: it accepted every key
        assert nodes[1].protocol.rejected["rate_limited"] == 0
        for key, value in zip(keys, values):
            held = nodes[1].protocol.storage.get(DHTID.generate(source=key))
            assert held is not None and MSGPackSerializer.loads(held.value) == value, key
    finally:
        await shutdown_all(nodes)


@pytest.mark.timeout(120)
async def test_keys_whose_values_cost_much_to_decode_are_not_refused_by_the_replica():
    # 600 lists of 128 floats (660 KB): in one request they cost more than a fresh peer's whole allowance
    rng = random.Random(0)
    keys = [f"float_list_{index}" for index in range(600)]
    await _store_and_check(keys, [[rng.random() for _ in range(128)] for _ in keys])


@pytest.mark.timeout(120)
async def test_more_small_keys_than_a_replica_takes_at_once_are_paced_and_all_stored():
    keys = [f"paced_small_key_{index}" for index in range(25000)]  # more items than a fresh peer's allowance
    await _store_and_check(keys, list(range(len(keys))))
