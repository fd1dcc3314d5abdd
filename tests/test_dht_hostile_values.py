"""
Hostile DHT values: msgpack nested too deep for any reader is refused where it enters a node (store requests, find
responses), and neither the serving node nor a reader of a poisoned key dies. The DHT under attack runs in its own
process (hivemind.DHT), so a crash shows up as a dead process instead of killing the test run.
"""

import asyncio
import math

import msgpack
import pytest

from hivemind.dht import DHT, DHTNode
from hivemind.dht.protocol import DHTProtocol
from hivemind.dht.request_checks import check_dictionary_entry, check_store_item
from hivemind.dht.routing import DHTID
from hivemind.dht.storage import DictionaryDHTValue
from hivemind.p2p import P2P
from hivemind.proto import dht_pb2
from hivemind.utils.serializer import MSGPackSerializer
from hivemind.utils.timed_storage import get_dht_time

KEY = DHTID.generate("key").to_bytes()
VALUE = MSGPackSerializer.dumps("value")


def nested_tuple_bytes(depth: int) -> bytes:
    """msgpack of ((...((None,),)...),) with ``depth`` tuples (300 of them crashed decoders with SIGSEGV)."""
    encoded = b"\xc0"
    for _ in range(depth):
        encoded = msgpack.packb(msgpack.ExtType(0x40, b"\x91" + encoded))
    return encoded


def dictionary_bytes(subkey: bytes, value: bytes, expiration: float) -> bytes:
    """An ext-0x50 dictionary with one entry; ``subkey`` is spliced in as already-encoded msgpack."""
    entries = b"\x91\x93" + subkey + msgpack.packb(value) + msgpack.packb(float(expiration))
    payload = b"\x93" + msgpack.packb(math.inf) + msgpack.packb(float(expiration)) + entries
    return msgpack.packb(msgpack.ExtType(0x50, payload))


# ---------------------------------------------------------------- checks on store items (pure)


@pytest.mark.parametrize("depth", [300, 3_000])
def test_store_item_with_deeply_nested_subkey_is_refused(depth):
    now = get_dht_time()
    assert check_store_item(KEY, nested_tuple_bytes(depth), VALUE, now + 10, now) == "malformed_subkey"


@pytest.mark.parametrize("depth", [300, 3_000])
def test_store_item_with_deeply_nested_value_is_refused_even_when_signed(depth):
    now = get_dht_time()
    poisoned = nested_tuple_bytes(depth)
    assert check_store_item(KEY, b"\xc0", poisoned, now + 10, now) == "malformed_value"
    assert check_store_item(KEY, b"\xc0", poisoned + b"[signature:abc]", now + 10, now) == "malformed_value"
    assert check_dictionary_entry(poisoned, now + 10, now) == "malformed_value"


def test_store_item_with_unhashable_subkey_is_refused():
    now = get_dht_time()
    assert check_store_item(KEY, MSGPackSerializer.dumps(["a", "list"]), VALUE, now + 10, now) == "unhashable_subkey"


def test_store_item_with_nesting_at_the_limit_is_accepted():
    now = get_dht_time()
    assert check_store_item(KEY, nested_tuple_bytes(20), nested_tuple_bytes(64), now + 10, now) is None


# ---------------------------------------------------------------- a DHT process under attack


@pytest.fixture
async def victim_and_attacker():
    """A DHT in its own process, and a bare P2P (no DHT of its own) that sends it raw requests."""
    victim = DHT(start=True)
    attacker = await P2P.create(initial_peers=victim.get_visible_maddrs())
    try:
        yield victim, DHTProtocol.get_stub(attacker, victim.peer_id)
    finally:
        await attacker.shutdown()
        victim.shutdown()


def raw_store(keys, subkeys, values, expirations):
    return dht_pb2.StoreRequest(
        keys=keys, subkeys=subkeys, values=values, expiration_time=expirations, peer=dht_pb2.NodeInfo()
    )


async def in_thread(function, *args, **kwargs):
    return await asyncio.get_running_loop().run_in_executor(None, lambda: function(*args, **kwargs))


@pytest.mark.timeout(60)
async def test_store_of_deeply_nested_items_is_refused_and_the_node_stays_up(victim_and_attacker):
    victim, stub = victim_and_attacker
    now, poisoned = get_dht_time(), nested_tuple_bytes(300)
    key = DHTID.generate("poisoned").to_bytes()
    request = raw_store(
        [key] * 3,
        [poisoned, b"\xc0", b""],  # as a subkey, as a regular value, as a subkey inside a whole dictionary
        [VALUE, poisoned, dictionary_bytes(poisoned, VALUE, now + 60)],
        [now + 60] * 3,
    )
    response = await asyncio.wait_for(stub.rpc_store(request), timeout=20)
    assert list(response.store_ok) == [False, False, False]
    assert victim.is_alive()
    assert await in_thread(victim.store, "honest", "value", get_dht_time() + 60)
    assert (await in_thread(victim.get, "honest")).value == "value"


@pytest.mark.timeout(60)
async def test_store_of_dictionary_with_deep_value_is_refused(victim_and_attacker):
    victim, stub = victim_and_attacker
    now = get_dht_time()
    request = raw_store([KEY], [b""], [dictionary_bytes(b"\xa1s", nested_tuple_bytes(300), now + 60)], [now + 60])
    assert list((await asyncio.wait_for(stub.rpc_store(request), timeout=20)).store_ok) == [False]
    assert victim.is_alive()


# ---------------------------------------------------------------- a reader of a poisoned key


@pytest.fixture
async def poisoned_node():
    """A node whose storage was poisoned directly (as an unchecked peer would let it be), and a reader DHT process."""
    node = await DHTNode.create()
    maddrs = await node.get_visible_maddrs()
    reader = await in_thread(DHT, initial_peers=maddrs, start=True)  # our loop must stay free to answer its pings
    try:
        yield node, reader
    finally:
        reader.shutdown()
        await node.shutdown()


@pytest.mark.timeout(60)
async def test_reader_of_poisoned_regular_value_gets_none_and_stays_up(poisoned_node):
    node, reader = poisoned_node
    key_id = DHTID.generate("poisoned-regular")
    assert node.protocol.storage.store(key_id, nested_tuple_bytes(300), get_dht_time() + 60)
    assert await in_thread(reader.get, "poisoned-regular", latest=True) is None
    assert reader.is_alive()
    assert await node.store("fine", "value", get_dht_time() + 60)
    assert (await in_thread(reader.get, "fine", latest=True)).value == "value"


@pytest.mark.timeout(60)
async def test_reader_of_dictionary_with_poisoned_entry_gets_the_other_entries(poisoned_node):
    node, reader = poisoned_node
    key_id, expiration = DHTID.generate("poisoned-dictionary"), get_dht_time() + 60
    storage = node.protocol.storage
    assert storage.store(key_id, nested_tuple_bytes(3_000), expiration, subkey="bad")
    assert storage.store(key_id, MSGPackSerializer.dumps("ok"), expiration, subkey="good")
    found = await in_thread(reader.get, "poisoned-dictionary", latest=True)
    assert reader.is_alive()
    assert found is not None and {subkey: item.value for subkey, item in found.value.items()} == {"good": "ok"}


@pytest.mark.timeout(30)
async def test_poisoned_dictionary_in_a_find_response_is_dropped():
    # the dictionary as a whole cannot be decoded: the reader counts it as malformed, not found (the depth is
    # beyond the limit but shallow enough not to crash this process with a recursive decoder)
    p2p_server, p2p_reader = await P2P.create(), None
    try:
        p2p_reader = await P2P.create(initial_peers=await p2p_server.get_visible_maddrs())
        server = await DHTProtocol.create(p2p_server, DHTID.generate(), 20, 5, 5, wait_timeout=3)
        reader = await DHTProtocol.create(p2p_reader, DHTID.generate(), 20, 5, 5, wait_timeout=3)
        poisoned = dictionary_bytes(nested_tuple_bytes(100), VALUE, get_dht_time() + 60)
        key_id = DHTID.generate("poisoned")
        server.serializer = _RawDictionaries(poisoned)  # answers with the poisoned bytes instead of encoding
        assert server.storage.store(key_id, VALUE, get_dht_time() + 60, subkey="placeholder")
        found = await reader.call_find(p2p_server.peer_id, [key_id])
        assert found[key_id][0] is None and reader.rejected["malformed_dictionary"] >= 1  # (+1 if replicated to it)
        await reader.shutdown()
        await server.shutdown()
    finally:
        for p2p in (p2p_reader, p2p_server):
            if p2p is not None:
                await p2p.shutdown()


class _RawDictionaries(MSGPackSerializer):
    """A serializer that encodes every DictionaryDHTValue as the given bytes (how a hostile peer would answer)."""

    def __init__(self, encoded_dictionary: bytes):
        self.encoded_dictionary = encoded_dictionary

    def dumps(self, obj):
        return self.encoded_dictionary if isinstance(obj, DictionaryDHTValue) else MSGPackSerializer.dumps(obj)
