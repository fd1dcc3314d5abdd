"""
Honest values that hold large binary strings inside a list, tuple or map (a serialized tensor beside its metadata, a
blob in a record) must reach remote replicas: the store rate limit weighs what decoding a value costs, and the random
bytes of a binary string decode at C speed whatever they look like.
"""

import os

import pytest

from hivemind.dht.node import DHTNode
from hivemind.dht.rate_limit import DEFAULT_BURST_ITEMS, decode_cost
from hivemind.dht.routing import DHTID
from hivemind.utils.serializer import MSGPackSerializer
from hivemind.utils.timed_storage import get_dht_time

VALUES = {
    "list of 1 MB": [os.urandom(1_000_000)],
    "tuple of 300 KB": (os.urandom(300_000), 1),
    "map of blobs": {"weights": os.urandom(400_000), "bias": os.urandom(400_000), "step": 7},
}


@pytest.mark.parametrize("name", list(VALUES))
def test_binary_strings_inside_containers_cost_like_their_bytes(name):
    encoded = MSGPackSerializer.dumps(VALUES[name])
    assert decode_cost(encoded) < 2 * len(encoded) / 2048 + 10


@pytest.mark.timeout(60)
async def test_values_with_large_binary_strings_inside_containers_reach_the_remote_replica():
    first = await DHTNode.create()
    second = await DHTNode.create(initial_peers=await first.get_visible_maddrs())
    try:
        expiration = get_dht_time() + 600
        for name, value in VALUES.items():
            assert await second.store(name, value, expiration, exclude_self=True), name
            stored = first.protocol.storage.get(DHTID.generate(name))
            assert stored is not None and MSGPackSerializer.loads(stored.value) == value, name
            assert first.protocol.rejected["rate_limited"] == 0
        assert await second.store("blobs", value=[os.urandom(500_000)], subkey="a", expiration_time=expiration)
        assert await second.store("blobs", value=[os.urandom(500_000)], subkey="b", expiration_time=expiration)
        stored = first.protocol.storage.get(DHTID.generate("blobs"))
        assert stored is not None and len(stored.value) == 2
    finally:
        await second.shutdown()
        await first.shutdown()


def test_structure_is_still_weighed_as_before():
    nested = MSGPackSerializer.dumps([[[[[i]]]] for i in range(2000)])
    assert decode_cost(nested) > 2000 * 4 * 256 / 2048 * 0.9
    assert DEFAULT_BURST_ITEMS >= 20000
