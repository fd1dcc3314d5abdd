"""
A store request is at most 4 MiB, but what it costs the receiving node to check and store depends on what it holds:
subkeys made of deeply nested tuples, each tuple a Python call to decode and another to encode, were decoded three
times and encoded three times, so one 4 MiB request of them took 11-21 s of the node's event loop, during which it
answered nobody. Each subkey is now decoded once and not encoded again, and the store rate limit weighs the bytes of
a request by what decoding them costs, so a fresh peer's worst request costs a fraction of a second.
CPU time is measured (time.process_time), not wall time.
"""

import asyncio
import functools
import os
import time

import msgpack
import pytest
from dht_flood_helpers import timed_store, victim_and_attacker

from hivemind.dht.node import DHTNode
from hivemind.dht.protocol import DHTProtocol
from hivemind.dht.rate_limit import DEFAULT_BURST_ITEMS, decode_cost, store_item_cost
from hivemind.dht.request_checks import decode_subkey, subkey_nbytes
from hivemind.dht.routing import DHTID
from hivemind.dht.storage import DictionaryDHTValue
from hivemind.proto import dht_pb2
from hivemind.utils.serializer import MSGPackSerializer
from hivemind.utils.timed_storage import get_dht_time

pytestmark = pytest.mark.usefixtures("frozen_heap")  # CPU-time bounds: see conftest.frozen_heap

MESSAGE_LIMIT = 4 * 1024 * 1024 - 4096  # what one unary request may carry, less room for framing


def nested_tuple(depth: int, leaf: object) -> bytes:
    """msgpack of ((...((leaf,),)...),) with ``depth`` tuples: the deepest subkey that a dictionary can hold."""
    encoded = MSGPackSerializer.dumps(leaf)
    return _tuple_headers(depth, len(encoded)) + encoded


@functools.cache
def _tuple_headers(depth: int, leaf_length: int) -> bytes:
    """What nested_tuple puts before the leaf: it depends only on the leaf's length (built once, it saves seconds)."""
    encoded = b"\x00" * leaf_length
    for _ in range(depth):
        encoded = msgpack.packb(msgpack.ExtType(0x40, b"\x91" + encoded))
    return encoded[:-leaf_length]


def hostile_request(make_item, fit_the_burst: bool) -> dht_pb2.StoreRequest:
    """Items from ``make_item(index) -> (key, subkey, value)`` up to the message limit (or the rate limit's burst)."""
    expiration = get_dht_time() + 600
    keys, subkeys, values, nbytes, cost = [], [], [], 0, 0.0
    for index in range(100_000):
        key, subkey, value = make_item(index)
        nbytes += len(key) + len(subkey) + len(value) + 20  # with protobuf's tags, lengths and the expiration
        cost += store_item_cost(subkey, value)
        if nbytes > MESSAGE_LIMIT or (fit_the_burst and cost > DEFAULT_BURST_ITEMS - 1):
            break
        keys.append(key), subkeys.append(subkey), values.append(value)
    return dht_pb2.StoreRequest(
        keys=keys, subkeys=subkeys, values=values, expiration_time=[expiration] * len(keys), peer=dht_pb2.NodeInfo()
    )


ATTACKS = {
    "deep tuple subkeys, one key": lambda index: (SHARED_KEY, nested_tuple(61, index), b"\xc0"),
    "deep tuple subkeys, many keys": lambda index: (DHTID.generate().to_bytes(), nested_tuple(61, index), b"\xc0"),
    "deep tuple values": lambda index: (DHTID.generate().to_bytes(), b"\xc0", nested_tuple(63, index)),
    "too deep subkeys": lambda index: (SHARED_KEY, nested_tuple(62, index), b"\xc0"),
    "deep arrays in values": lambda index: (DHTID.generate().to_bytes(), b"\xc0", b"\x91" * 63 + b"\x00"),
}
SHARED_KEY = DHTID.generate("shared").to_bytes()


@pytest.fixture(name="victim_and_attacker")
async def victim_and_attacker_fixture(p2p_factory):
    victim, attacker = await victim_and_attacker(p2p_factory)
    yield victim, attacker
    await victim.shutdown()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("fit_the_burst", [True, False], ids=["within the burst", "whole message"])
@pytest.mark.parametrize("attack", list(ATTACKS))
async def test_the_worst_store_requests_cost_well_under_a_second_of_cpu(victim_and_attacker, attack, fit_the_burst):
    victim, attacker = victim_and_attacker
    request = hostile_request(ATTACKS[attack], fit_the_burst)
    stub = DHTProtocol.get_stub(attacker, victim.p2p.peer_id)
    spent, response = await timed_store(stub, request)
    assert len(response.store_ok) == len(request.keys)
    assert spent < 1.0, f"{attack}: {len(request.keys)} items ({request.ByteSize()} bytes) took {spent:.2f} s of CPU"
    if fit_the_burst and "too deep" not in attack:
        assert sum(response.store_ok) > 0 and victim.rejected["rate_limited"] == 0  # processed, not refused


@pytest.mark.timeout(120)
async def test_honest_reads_are_served_during_a_flood_of_costly_stores():
    victim = await DHTNode.create()
    honest = await DHTNode.create(initial_peers=await victim.get_visible_maddrs())
    attackers = []
    try:
        assert await honest.store("honest key", "honest value", get_dht_time() + 600)
        for _ in range(2):  # two identities, each with its own burst
            attackers.append(await DHTNode.create(initial_peers=await victim.get_visible_maddrs(), client_mode=True))
        request = hostile_request(ATTACKS["deep tuple subkeys, many keys"], fit_the_burst=False)
        started = time.process_time()
        flood = [
            DHTProtocol.get_stub(attacker.p2p, victim.peer_id).rpc_store(request, timeout=60)
            for attacker in attackers
            for _ in range(3)
        ]
        flood = asyncio.gather(*flood)
        found = await honest.get("honest key", latest=True)
        await flood
        spent = time.process_time() - started
        assert found is not None and found.value == "honest value"
        assert spent < 3.0, f"six hostile 4 MiB stores and one get took {spent:.2f} s of CPU"
    finally:
        await asyncio.gather(*(node.shutdown() for node in [victim, honest, *attackers]))


@pytest.mark.timeout(60)
async def test_a_whole_dictionary_of_big_binary_values_is_stored_whole(victim_and_attacker):
    """Its values' random bytes look like msgpack structure; they were charged as such (22 000 items for 1 MiB)."""
    victim, sender = victim_and_attacker
    expiration = get_dht_time() + 600
    dictionary = DictionaryDHTValue()
    for index in range(10):
        dictionary.store(index, MSGPackSerializer.dumps(os.urandom(100_000)), expiration)
    encoded = MSGPackSerializer.dumps(dictionary)
    request = dht_pb2.StoreRequest(
        keys=[DHTID.generate("blobs").to_bytes()], subkeys=[b""], values=[encoded], expiration_time=[expiration]
    )
    response = await DHTProtocol.get_stub(sender, victim.p2p.peer_id).rpc_store(request, timeout=30)
    assert list(response.store_ok) == [True] and victim.rejected["rate_limited"] == 0
    assert len(victim.storage.get(DHTID.generate("blobs")).value) == 10


def test_decoding_cost_counts_structure_not_payload():
    assert decode_cost(MSGPackSerializer.dumps(bytes(4096))) < 3  # one binary string: payload bytes are cheap
    assert decode_cost(nested_tuple(61, 0)) > 10 * decode_cost(MSGPackSerializer.dumps(bytes(250)))


def pack_with_float32(obj: object) -> bytes:
    """Like MSGPackSerializer.dumps, but with floats as float32 (as another msgpack encoder may send them)."""

    def tuples(item):
        return msgpack.ExtType(0x40, pack_with_float32(list(item)))

    return msgpack.packb(obj, use_single_float=True, strict_types=True, use_bin_type=True, default=tuples)


@pytest.mark.parametrize(
    "subkey",
    [(1.5, 2.5), ("a", (1, (2.0,))), b"\x00" * 40, "PQ string", -(2**40)],
    ids=["floats", "nested", "bytes", "string with registered ext codes", "int"],
)
def test_a_subkey_counts_at_least_as_long_as_it_encodes(subkey):
    encoded = MSGPackSerializer.dumps(subkey)
    float32 = pack_with_float32(subkey)
    for received in (encoded, float32):  # float32 decodes to a float that encodes back as float64: 4 bytes longer
        decoded, reason = decode_subkey(received)
        assert reason is None and decoded == subkey
        assert subkey_nbytes(received, decoded) >= len(MSGPackSerializer.dumps(decoded))
