"""
A node's store requests to one peer share that peer's store rate limit on a replica of ours (a request beyond it is
refused whole): store_many and the hand-over of stored keys to a newcomer, running at the same time, must keep
within it together, not each within three quarters of it.
"""

import asyncio

import pytest

from hivemind.dht.node import DHTNode
from hivemind.dht.routing import DHTID
from hivemind.utils.serializer import MSGPackSerializer
from hivemind.utils.timed_storage import get_dht_time


@pytest.mark.timeout(120)
async def test_store_many_beside_the_hand_over_to_a_newcomer_is_not_refused():
    holder = await DHTNode.create()
    expiration = get_dht_time() + 600
    for index in range(20000):  # keys the newcomer should get from the holder when it joins
        holder.protocol.storage.store(DHTID.generate(f"held_{index}"), MSGPackSerializer.dumps(index), expiration)
    newcomer = await DHTNode.create(initial_peers=await holder.get_visible_maddrs())
    try:
        keys = [f"new_{index}" for index in range(15000)]
        stored = await holder.store_many(keys, list(range(len(keys))), expiration, exclude_self=True)
        assert sum(stored.values()) == len(keys)
        for _ in range(600):  # until the hand-over is over (~15 s of requests) or the newcomer refused some
            if len(newcomer.protocol.storage) >= 35000 or newcomer.protocol.rejected["rate_limited"] > 0:
                break
            await asyncio.sleep(0.1)
        assert newcomer.protocol.rejected["rate_limited"] == 0
        assert len(newcomer.protocol.storage) == 35000
    finally:
        await newcomer.shutdown()
        await holder.shutdown()
