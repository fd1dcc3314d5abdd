"""
A whole dictionary sent to be stored (replication, caching) that could never be stored whole, being beyond the per-key
limits, is refused at once: checking its entries one by one took seconds of the DHT's event loop for 4 MiB of tiny
entries, from a single store item.
"""

import msgpack
import pytest

from hivemind.dht.protocol import DHTProtocol
from hivemind.dht.routing import DHTID
from hivemind.dht.storage import MAX_DICTIONARY_ENTRIES, MAX_ENCODED_DICTIONARY_BYTES, DictionaryDHTValue
from hivemind.p2p import P2P
from hivemind.utils.serializer import MSGPackSerializer
from hivemind.utils.timed_storage import get_dht_time


def dictionary_bytes(num_entries: int, value: bytes, expiration: float) -> bytes:
    """An ext-0x50 dictionary of subkeys 0, 1, ... each holding ``value``."""
    entries = b"".join(
        b"\x93" + msgpack.packb(i) + msgpack.packb(value) + msgpack.packb(expiration) for i in range(num_entries)
    )
    header = b"\xdd" + num_entries.to_bytes(4, "big")
    payload = b"\x93" + msgpack.packb(float("inf")) + msgpack.packb(expiration) + header + entries
    return msgpack.packb(msgpack.ExtType(0x50, payload))


@pytest.fixture
async def protocol():
    p2p = await P2P.create()
    protocol = await DHTProtocol.create(p2p, DHTID.generate(), 20, 5, 5, wait_timeout=3)
    try:
        yield protocol
    finally:
        await protocol.shutdown()
        await p2p.shutdown()


def store_whole(protocol: DHTProtocol, key_id: DHTID, encoded: bytes, expiration: float) -> bool:
    return protocol._store_item(key_id.to_bytes(), b"", encoded, expiration, False, get_dht_time())


@pytest.mark.parametrize(
    "num_entries, value",
    [(MAX_DICTIONARY_ENTRIES + 1, b"\xc0"), (3, b"x" * (MAX_ENCODED_DICTIONARY_BYTES // 3))],
    ids=["too many entries", "too many bytes"],
)
async def test_dictionary_beyond_the_limits_is_refused_whole_at_once(protocol, num_entries, value):
    expiration, key_id = get_dht_time() + 60, DHTID.generate("inflated")
    assert not store_whole(protocol, key_id, dictionary_bytes(num_entries, value, expiration), expiration)
    assert protocol.rejected["dictionary_full"] == 1  # one refusal, not one per entry
    assert protocol.storage.get(key_id) is None


async def test_dictionary_at_the_limits_is_stored_whole(protocol):
    expiration, key_id = get_dht_time() + 60, DHTID.generate("full")
    encoded = dictionary_bytes(MAX_DICTIONARY_ENTRIES, MSGPackSerializer.dumps(None), expiration)
    assert store_whole(protocol, key_id, encoded, expiration)
    stored = protocol.storage.get(key_id).value
    assert isinstance(stored, DictionaryDHTValue) and len(stored) == MAX_DICTIONARY_ENTRIES
    assert len(MSGPackSerializer.dumps(stored)) <= MAX_ENCODED_DICTIONARY_BYTES


async def test_dictionary_full_by_bytes_is_stored_whole_elsewhere(protocol):
    # replication sends a node's dictionary whole: one filled up to the byte limit must fit the encoded-size bound
    expiration, key_id = get_dht_time() + 60, DHTID.generate("full-by-bytes")
    subkey = 0
    while protocol.storage.store_subkey(key_id, subkey, b"x" * (100_000 + subkey), expiration):
        subkey += 1
    encoded = MSGPackSerializer.dumps(protocol.storage.get(key_id).value)
    assert len(encoded) <= MAX_ENCODED_DICTIONARY_BYTES
    assert store_whole(protocol, DHTID.generate("replica"), encoded, expiration)
