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


def test_an_original_nodes_handover_of_expert_declarations_is_kept_by_our_newcomer(module_peers):
    """A whole dictionary's entry costs one item plus decoding its subkey and value (docs/security.md): the prefix
    dictionaries of declare_experts (int -> (uid, peer)) cost ~1.36 items per entry where they cost one. A lone
    original node holding the declarations of 4 096 experts (a 64 x 64 grid: 4 096 keys and 64 dictionaries of 64
    entries, ~10 000 items here, ~8 500 before) and group keys hands them over to our newcomer in one request: all
    kept."""
    original, ours = module_peers(ORIGINAL, "handover-holder"), module_peers(OURS, "handover-newcomer")
    lone = original.call("dht_create", timeout=60)
    prefix, now = f"ffn{uuid.uuid4().hex[:6]}", time.time()
    uids = [f"{prefix}.{i}.{j}" for i in range(64) for j in range(64)]
    for first in range(0, len(uids), 256):  # as 16 servers (the original's DHT process dies on a long call)
        declared = uids[first : first + 256]
        assert original.call("dht_declare_experts", handle=lone["handle"], uids=declared, expiration=now + 300)
    group_key, members = f"{prefix}_grad_averager.0b01", [os.urandom(38) for _ in range(32)]
    for index, member in enumerate(members):
        stored = original.call(
            "dht_store",
            handle=lone["handle"],
            key_pkl=_dump(group_key),
            value_pkl=_dump(True),
            subkey_pkl=_dump(member),
            expiration=now + 300 + index / 64,
            timeout=60,
        )
        assert stored
    newcomer = ours.call("dht_create", initial_peers=lone["maddrs"], timeout=60)
    time.sleep(3.0)  # the hand-over starts when the holder first sees the newcomer (its bootstrap ping)
    # only our node can answer now: what it did not keep is gone
    assert original.call("dht_shutdown", handle=lone["handle"], timeout=60)

    def entries(key):
        found = ours.call("dht_get", handle=newcomer["handle"], key_pkl=_dump(key), latest=True, timeout=60)
        assert found["found"] and found["kind"] == "dictionary", key
        return pickle.loads(bytes.fromhex(found["value_pkl"]))

    assert set(entries(group_key)) == set(members)
    for i in range(0, 64, 9):
        held = entries(f"{prefix}.{i}.")
        assert sorted(held) == list(range(64)), i
        assert held[5][0] == (f"{prefix}.{i}.5", lone["peer_id"])
    for uid in uids[::500]:
        found = ours.call("dht_get", handle=newcomer["handle"], key_pkl=_dump(uid), latest=True, timeout=60)
        assert found["found"] and pickle.loads(bytes.fromhex(found["value_pkl"])) == lone["peer_id"], uid
