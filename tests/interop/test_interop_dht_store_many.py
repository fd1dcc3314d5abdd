"""
store_many of thousands of keys sends each replica many keys per StoreRequest: an original hivemind 1.1.12 peer takes
such requests and holds every key.
"""

import time
import uuid

import pytest

from .conftest import ORIGINAL, OURS

pytestmark = [pytest.mark.interop, pytest.mark.timeout(180)]

NUM_KEYS = 3000


def test_our_store_many_reaches_an_original_replica_with_every_key(module_peers):
    original, ours = module_peers(ORIGINAL, "store-many-original"), module_peers(OURS, "store-many-ours")
    first = ours.call("dht_create", timeout=60)
    replica = original.call("dht_create", initial_peers=first["maddrs"], timeout=60)
    second = ours.call("dht_create", initial_peers=replica["maddrs"], timeout=60)
    label = uuid.uuid4().hex[:8]

    # three peers, five replicas per key: every peer is a replica of every key
    expiration = time.time() + 300
    prefix = f"ours-{label}"
    assert (
        ours.call(
            "dht_store_many", handle=first["handle"], prefix=prefix, count=NUM_KEYS, expiration=expiration, timeout=120
        )
        == NUM_KEYS
    )
    assert original.call("dht_count_stored", handle=replica["handle"], prefix=prefix, count=NUM_KEYS) == NUM_KEYS
    assert ours.call("dht_count_stored", handle=second["handle"], prefix=prefix, count=NUM_KEYS) == NUM_KEYS
