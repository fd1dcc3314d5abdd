"""
A key poisoned through an original hivemind 1.1.12 peer (a regular value nested far deeper than any decoder allows)
must read as missing on our nodes, whose DHT process stays up, and our nodes refuse to store it in the first place.
"""

import pickle
import time
import uuid

import pytest

from .conftest import ORIGINAL, OURS

pytestmark = [pytest.mark.interop, pytest.mark.timeout(120)]


def _dump(obj) -> str:
    return pickle.dumps(obj).hex()


def _nested_tuple(depth: int) -> tuple:
    nested = None
    for _ in range(depth):
        nested = (nested,)
    return nested


def test_key_poisoned_through_an_original_peer_reads_as_missing_and_our_reader_stays_up(module_peers):
    original, ours = module_peers(ORIGINAL, "poison-planter"), module_peers(OURS, "poison-reader")
    planter = original.call("dht_create", timeout=60)
    reader = ours.call("dht_create", initial_peers=planter["maddrs"], timeout=60)
    label, now = uuid.uuid4().hex[:8], time.time()

    poisoned_key = f"poisoned-{label}"  # the original encodes it without complaint and keeps it in its own storage
    original.call(
        "dht_store",
        handle=planter["handle"],
        key_pkl=_dump(poisoned_key),
        value_pkl=_dump(_nested_tuple(300)),
        expiration=now + 60,
        timeout=30,
    )
    found = ours.call("dht_get", handle=reader["handle"], key_pkl=_dump(poisoned_key), latest=True, timeout=30)
    assert not found["found"], f"a poisoned value was returned: {found}"

    fine_key = f"fine-{label}"  # the reader's DHT process is still alive and serving
    assert ours.call(
        "dht_store", handle=reader["handle"], key_pkl=_dump(fine_key), value_pkl=_dump("ok"), expiration=now + 60
    )
    found = ours.call("dht_get", handle=reader["handle"], key_pkl=_dump(fine_key), latest=True, timeout=30)
    assert found["found"] and pickle.loads(bytes.fromhex(found["value_pkl"])) == "ok"
