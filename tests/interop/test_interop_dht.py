"""A mixed DHT swarm: 4 nodes of the original hivemind 1.1.12 and 4 of ours.

Topology: original node 0 starts alone; our node 0 bootstraps from it; original nodes 1-3 bootstrap from our
node 0 and our nodes 1-3 from original node 0, so each implementation joins through the other. Every node runs
RSASignatureValidator. Records written through one implementation are read through every node of the other one
and must come back with the same value (same Python types) and the very same expiration time.
"""

import pickle
import time
import uuid
from typing import Any, Dict, List, Optional

import pytest

from .conftest import DIRECTION_IDS, DIRECTIONS, ORIGINAL, OURS

pytestmark = [pytest.mark.interop, pytest.mark.timeout(90)]

NODES_PER_SIDE = 4
GET_TIMEOUT = 20


class Swarm:
    def __init__(self, drivers: Dict[str, Any], nodes: Dict[str, List[dict]]):
        self.drivers, self.nodes = drivers, nodes
        self.handles = {side: [node["handle"] for node in side_nodes] for side, side_nodes in nodes.items()}

    def store(self, side: str, node: int, key, value, expiration: float, subkey=None, handle=None) -> bool:
        args = dict(key_pkl=_dump(key), value_pkl=_dump(value), expiration=expiration)
        if subkey is not None:
            args["subkey_pkl"] = _dump(subkey)
        handle = self.handles[side][node % NODES_PER_SIDE] if handle is None else handle
        return self.drivers[side].call("dht_store", handle=handle, timeout=GET_TIMEOUT, **args)

    def get(self, side: str, handle: int, key, latest: bool = False) -> Optional[tuple]:
        args = dict(handle=handle, key_pkl=_dump(key), latest=latest)
        return _decode(self.drivers[side].call("dht_get", timeout=GET_TIMEOUT, **args))

    def get_everywhere(self, side: str, key, latest: bool = False) -> List[Optional[tuple]]:
        """`get` through every node of `side` (concurrently); each result as (kind, value, expiration) or None."""
        driver = self.drivers[side]
        ids = [driver.submit("dht_get", handle=h, key_pkl=_dump(key), latest=latest) for h in self.handles[side]]
        return [_decode(driver.wait(request_id, GET_TIMEOUT, "dht_get")) for request_id in ids]

    def owner_tag(self, side: str) -> bytes:
        return bytes.fromhex(self.drivers[side].call("dht_owner_tag"))


def _dump(obj) -> str:
    return pickle.dumps(obj).hex()


def _decode(result: dict) -> Optional[tuple]:
    if not result["found"]:
        return None
    return result["kind"], pickle.loads(bytes.fromhex(result["value_pkl"])), result["expiration"]


def _same(results: List[Optional[tuple]], expected: Optional[tuple]) -> bool:
    """Equal including Python types (a tuple is not a list, bytes are not str): compared by repr."""
    return all(repr(result) == repr(expected) for result in results)


@pytest.fixture(scope="module")
def swarm(module_peers) -> Swarm:
    original = module_peers(ORIGINAL, "dht-original")
    ours = module_peers(OURS, "dht-ours")
    first_original = original.call("dht_create", signed=True, timeout=60)
    first_ours = ours.call("dht_create", initial_peers=first_original["maddrs"], signed=True, timeout=60)
    pending = {
        ORIGINAL: [original.submit("dht_create", initial_peers=first_ours["maddrs"], signed=True) for _ in range(3)],
        OURS: [ours.submit("dht_create", initial_peers=first_original["maddrs"], signed=True) for _ in range(3)],
    }
    drivers = {ORIGINAL: original, OURS: ours}
    nodes = {ORIGINAL: [first_original], OURS: [first_ours]}
    for side, request_ids in pending.items():
        nodes[side] += [drivers[side].wait(i, 60, "dht_create") for i in request_ids]
    return Swarm(drivers, nodes)


def unique_key(label: str) -> str:
    return f"{label}-{uuid.uuid4().hex[:8]}"


@pytest.mark.parametrize("writer, reader", DIRECTIONS, ids=DIRECTION_IDS)
def test_values_stored_by_one_implementation_are_read_by_the_other(swarm, writer, reader):
    label = unique_key("values")
    records = {
        f"{label}-str": "text ✓",
        (label, 7): (1, 2.5, "tuple", b"\x00"),
        f"{label}-list": [1, [2, 3], {"nested": (4,)}],
        label.encode(): b"\x00\xffraw bytes",  # bytes keys are hashed raw, not msgpack-encoded first
        f"{label}-none": None,
        f"{label}-dict": {"a": 1, "b": [True, None, -1.5]},
        f"{label}-bigint": 2**40 + 1,
    }
    now = time.time()
    for i, (key, value) in enumerate(records.items()):
        expiration = now + 60 + i * 1.000123
        assert swarm.store(writer, i, key, value, expiration), f"{writer} failed to store {key!r}"
        expected = ("regular", value, expiration)
        results = swarm.get_everywhere(reader, key)
        assert _same(results, expected), f"{reader} read {results} for {key!r}, expected {expected}"


@pytest.mark.parametrize("first, second", DIRECTIONS, ids=DIRECTION_IDS)
def test_newer_expiration_wins_and_latest_finds_it_across_implementations(swarm, first, second):
    key, now = unique_key("latest"), time.time()
    assert swarm.store(first, 0, key, "v1", now + 30)
    # every node of the second side reads (and caches) v1 before it is replaced
    assert _same(swarm.get_everywhere(second, key), ("regular", "v1", now + 30))

    assert swarm.store(second, 1, key, "v2", now + 60), "a newer expiration must replace the value"
    assert not swarm.store(first, 2, key, "v3", now + 45), "an older expiration must be rejected"
    assert not swarm.store(first, 3, key, "v4", now + 60), "an equal expiration must be rejected"

    for side in (first, second):
        latest = swarm.get_everywhere(side, key, latest=True)
        assert _same(latest, ("regular", "v2", now + 60)), f"{side} get(latest=True) returned {latest}"
        for result in swarm.get_everywhere(side, key, latest=False):  # possibly a stale but valid entry
            assert repr(result) in (repr(("regular", "v1", now + 30)), repr(("regular", "v2", now + 60)))


def test_dictionary_subkeys_from_both_implementations_merge(swarm):
    key, now = unique_key("dictionary"), time.time()
    assert swarm.store(ORIGINAL, 0, key, "from original", now + 40, subkey="by_original")
    assert swarm.store(OURS, 0, key, ("from", "ours"), now + 50, subkey=b"by_ours")
    assert swarm.store(ORIGINAL, 1, key, [1, 2], now + 45, subkey=7)
    assert swarm.store(OURS, 1, key, None, now + 35, subkey=("tuple", 1))
    # per-subkey rules: equal or older expiration rejected by the other implementation, newer accepted
    assert not swarm.store(OURS, 2, key, "stale", now + 40, subkey="by_original")
    assert not swarm.store(ORIGINAL, 2, key, "stale", now + 49, subkey=b"by_ours")
    assert swarm.store(OURS, 3, key, "renewed by ours", now + 55, subkey="by_original")

    expected_entries = {
        "by_original": ("renewed by ours", now + 55),
        b"by_ours": (("from", "ours"), now + 50),
        7: ([1, 2], now + 45),
        ("tuple", 1): (None, now + 35),
    }
    for side in (ORIGINAL, OURS):
        for result in swarm.get_everywhere(side, key, latest=True):
            assert result is not None, f"{side} did not find dictionary {key}"
            kind, entries, expiration = result
            assert kind == "dictionary" and expiration == now + 55
            assert {repr(k): repr(v) for k, v in entries.items()} == {
                repr(k): repr(v) for k, v in expected_entries.items()
            }, f"{side} read {entries}"


@pytest.mark.parametrize("first, second", DIRECTIONS, ids=DIRECTION_IDS)
def test_regular_and_dictionary_values_replace_each_other_only_when_newer(swarm, first, second):
    key, now = unique_key("kind-change"), time.time()
    assert swarm.store(first, 0, key, "regular", now + 40)
    assert not swarm.store(second, 0, key, "entry", now + 39, subkey="s"), "older subkey must not replace"
    assert swarm.store(second, 1, key, "entry", now + 41, subkey="s")
    assert _same(swarm.get_everywhere(first, key, latest=True), ("dictionary", {"s": ("entry", now + 41)}, now + 41))
    assert not swarm.store(first, 1, key, "regular again", now + 41), "equal expiration must not replace"
    assert swarm.store(first, 2, key, "regular again", now + 42)
    assert _same(swarm.get_everywhere(second, key, latest=True), ("regular", "regular again", now + 42))


@pytest.mark.parametrize("writer, reader", DIRECTIONS, ids=DIRECTION_IDS)
def test_signed_records_are_read_by_the_other_implementation(swarm, writer, reader):
    key, expiration = unique_key("signed"), time.time() + 60
    tag = swarm.owner_tag(writer)
    assert tag.startswith(b"[owner:ssh-rsa ") and tag.endswith(b"]")
    assert swarm.store(writer, 0, key, {"payload": writer}, expiration, subkey=tag)
    expected = ("dictionary", {tag: ({"payload": writer}, expiration)}, expiration)  # signature stripped
    for side in (reader, writer):
        results = swarm.get_everywhere(side, key, latest=True)
        assert _same(results, expected), f"{side} read {results}"


@pytest.mark.parametrize("writer, owner", DIRECTIONS, ids=DIRECTION_IDS)
def test_records_under_the_other_implementations_owner_tag_are_rejected(swarm, writer, owner):
    key, expiration = unique_key("forged"), time.time() + 60
    foreign_tag = swarm.owner_tag(owner)  # the writer cannot sign for this key, so its record is unsigned
    assert not swarm.store(writer, 0, key, "forged", expiration, subkey=foreign_tag)
    for side in (owner, writer):
        assert swarm.get_everywhere(side, key, latest=True) == [None] * NODES_PER_SIDE


@pytest.mark.parametrize("client, servers", DIRECTIONS, ids=["original-client", "ours-client"])
def test_client_mode_node_stores_and_gets_through_the_other_implementation(swarm, client, servers):
    initial_peers = swarm.nodes[servers][1]["maddrs"]
    node = swarm.drivers[client].call("dht_create", initial_peers=initial_peers, client_mode=True, signed=True)
    try:
        key, expiration = unique_key("client"), time.time() + 60
        assert swarm.store(client, 0, key, ["from", "client"], expiration, handle=node["handle"])
        assert _same(swarm.get_everywhere(servers, key), ("regular", ["from", "client"], expiration))

        key, expiration = unique_key("for-client"), time.time() + 61
        assert swarm.store(servers, 2, key, b"for the client", expiration)
        assert repr(swarm.get(client, node["handle"], key)) == repr(("regular", b"for the client", expiration))
    finally:
        swarm.drivers[client].call("dht_shutdown", handle=node["handle"])


@pytest.fixture(scope="module")
def schema_swarm(swarm):
    """2 original + 2 our nodes with the same SchemaValidators (fields `name: StrictStr` and
    `counts: Dict[StrictStr, StrictInt]`, prefixes "schema_original" and "schema_ours", one per writer), and per side
    a client-mode node without validators that sends whatever it is given."""
    prefixes = [f"schema_{side}" for side in (ORIGINAL, OURS)]
    first = swarm.drivers[ORIGINAL].call("dht_create", schema_prefixes=prefixes, timeout=60)
    pending = [
        (side, swarm.drivers[side].submit("dht_create", initial_peers=first["maddrs"], schema_prefixes=prefixes))
        for side in (ORIGINAL, OURS, OURS)
    ]
    nodes = {ORIGINAL: [first], OURS: []}
    for side, request_id in pending:
        nodes[side].append(swarm.drivers[side].wait(request_id, 60, "dht_create"))
    unchecked = {
        side: swarm.drivers[side].call("dht_create", initial_peers=first["maddrs"], client_mode=True, timeout=60)
        for side in (ORIGINAL, OURS)
    }
    return nodes, unchecked


@pytest.mark.parametrize("writer", [ORIGINAL, OURS], ids=["original-writer", "ours-writer"])
def test_schema_validators_of_both_implementations_agree(swarm, schema_swarm, writer):
    nodes, unchecked = schema_swarm
    writer_handle, now = unchecked[writer]["handle"], time.time()
    name_key, counts_key = f"schema_{writer}_name", f"schema_{writer}_counts"

    def store(key, value, expiration, subkey=None):
        return swarm.store(writer, 0, key, value, expiration, subkey=subkey, handle=writer_handle)

    assert not store(name_key, 3, now + 30), "an int is not a StrictStr"
    assert not store(counts_key, 1.0, now + 30, subkey="a"), "a float is not a StrictInt"
    assert not store(counts_key, {"a": 1}, now + 30), "a plain dict is not accepted for a subkeyed field"
    # read through the other side's unchecked node: the writer itself may have cached what it sent
    reader = OURS if writer == ORIGINAL else ORIGINAL
    for key in (name_key, counts_key):
        found = swarm.get(reader, unchecked[reader]["handle"], key, latest=True)
        assert found is None, f"some node stored an invalid {key}: {found}"

    assert store(name_key, f"by {writer}", now + 40)
    assert store(counts_key, 7, now + 50, subkey=writer)
    assert store(f"schema_{writer}_not_in_schema", [1.5], now + 60), "unknown keys pass with allow_extra_keys=True"
    for side in (ORIGINAL, OURS):
        for node in nodes[side]:
            name = swarm.get(side, node["handle"], name_key, latest=True)
            assert repr(name) == repr(("regular", f"by {writer}", now + 40)), f"{side} read {name}"
            counts = swarm.get(side, node["handle"], counts_key, latest=True)
            assert repr(counts) == repr(("dictionary", {writer: (7, now + 50)}, now + 50)), f"{side} read {counts}"


@pytest.mark.parametrize("holder, newcomer", DIRECTIONS, ids=DIRECTION_IDS)
def test_a_lone_node_hands_its_keys_to_a_newcomer_of_the_other_implementation(swarm, holder, newcomer):
    """A node pushes the keys it stores to a newly seen peer that should hold them too (a node without
    neighbours pushes everything), so they survive the holder leaving."""
    lone = swarm.drivers[holder].call("dht_create", timeout=60)  # a separate one-node swarm
    keys, expiration = [unique_key(f"handover-{i}") for i in range(5)], time.time() + 60
    for i, key in enumerate(keys):
        assert swarm.store(holder, 0, key, i, expiration, handle=lone["handle"])
    joined = swarm.drivers[newcomer].call("dht_create", initial_peers=lone["maddrs"], timeout=60)
    try:
        # no reads before the holder leaves: they would cache the values in the newcomer and prove nothing
        time.sleep(2.0)  # the hand-over starts when the holder first sees the newcomer (its bootstrap ping)
        swarm.drivers[holder].call("dht_shutdown", handle=lone["handle"])
        for i, key in enumerate(keys):
            assert repr(swarm.get(newcomer, joined["handle"], key)) == repr(("regular", i, expiration))
    finally:
        swarm.drivers[newcomer].call("dht_shutdown", handle=joined["handle"])
