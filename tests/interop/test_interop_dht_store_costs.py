"""
Our nodes weigh a store request's bytes by what decoding them costs (hivemind.dht.rate_limit): what an original
hivemind 1.1.12 peer stores there, big values, container values and dictionaries, must still be accepted.
"""

import os
import pickle
import random
import time
import uuid

import pytest

from .conftest import ORIGINAL, OURS

pytestmark = [pytest.mark.interop, pytest.mark.timeout(180)]


def _dump(obj) -> str:
    return pickle.dumps(obj).hex()


def test_what_an_original_peer_stores_on_our_node_is_kept_there(module_peers):
    original, ours = module_peers(ORIGINAL, "store-cost-writer"), module_peers(OURS, "store-cost-holder")
    holder = ours.call("dht_create", timeout=60)
    writer = original.call("dht_create", initial_peers=holder["maddrs"], timeout=60)
    label, now = uuid.uuid4().hex[:8], time.time()
    rng = random.Random(label)
    # the original's DHT process dies on a call whose arguments do not arrive in one read of its pipe: values are small
    records = {
        f"big-{label}": (os.urandom(6 * 1024), None),
        f"floats-{label}": ([rng.random() for _ in range(600)], None),
        f"nested-{label}": ({"peers": [(os.urandom(34), rng.random(), [i, str(i)]) for i in range(80)]}, None),
    }
    dictionary_key = f"dictionary-{label}"
    subkeys = [("peer", i, os.urandom(8)) for i in range(40)] + [os.urandom(34) for _ in range(40)]
    for key, (value, _) in records.items():
        assert original.call(
            "dht_store",
            handle=writer["handle"],
            key_pkl=_dump(key),
            value_pkl=_dump(value),
            expiration=now + 120,
            timeout=60,
        )
    for index, subkey in enumerate(subkeys):
        assert original.call(
            "dht_store",
            handle=writer["handle"],
            key_pkl=_dump(dictionary_key),
            value_pkl=_dump([index, os.urandom(64)]),
            subkey_pkl=_dump(subkey),
            expiration=now + 120 + index / 64,  # distinct: the original compares the subkeys of equal expirations
            timeout=60,
        )

    # only our node can answer now: the writer is gone, the reader knows nobody else
    assert original.call("dht_shutdown", handle=writer["handle"], timeout=60)
    reader = ours.call("dht_create", initial_peers=holder["maddrs"], timeout=60)
    for key, (value, _) in records.items():
        found = ours.call("dht_get", handle=reader["handle"], key_pkl=_dump(key), latest=True, timeout=60)
        assert found["found"] and pickle.loads(bytes.fromhex(found["value_pkl"])) == value, key
    found = ours.call("dht_get", handle=reader["handle"], key_pkl=_dump(dictionary_key), latest=True, timeout=60)
    assert found["found"]
    entries = pickle.loads(bytes.fromhex(found["value_pkl"]))
    assert set(entries) == set(subkeys)


def test_a_value_costlier_than_our_allowance_reaches_an_original_replica(module_peers):
    """45 000 tuples cost a replica of ours more than a fresh peer's allowance (one borrowed request); our node sends
    them to an original replica as to one of ours, which holds them after our node is gone."""
    original, ours = module_peers(ORIGINAL, "store-cost-replica"), module_peers(OURS, "store-cost-storer")
    storer = ours.call("dht_create", timeout=60)
    replica = original.call("dht_create", initial_peers=storer["maddrs"], timeout=60)
    key, rng = f"tuples-{uuid.uuid4().hex[:8]}", random.Random(11)
    value = [(rng.random(), rng.random()) for _ in range(45_000)]  # ~1 MB, 55 000 items in our store rate limit
    stored = ours.call(
        "dht_store", handle=storer["handle"], key_pkl=_dump(key), value_pkl=_dump(value), expiration=time.time() + 120
    )
    assert stored
    assert ours.call("dht_shutdown", handle=storer["handle"], timeout=60)
    reader = ours.call("dht_create", initial_peers=replica["maddrs"], timeout=60)
    found = ours.call("dht_get", handle=reader["handle"], key_pkl=_dump(key), latest=True, timeout=60)
    assert found["found"] and pickle.loads(bytes.fromhex(found["value_pkl"])) == value
