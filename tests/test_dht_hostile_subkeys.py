"""
A subkey that decodes on its own but not inside a dictionary value (three arrays and one ext type deeper) used to be
stored: every later find of its key then carried a dictionary that no reader could decode, so one store made all the
honest entries of the key unreadable. Such subkeys are refused where they enter a node.
"""

import asyncio

import msgpack
import pytest

from hivemind.dht import DHT
from hivemind.dht.protocol import DHTProtocol
from hivemind.dht.request_checks import check_store_item, check_subkey_bytes
from hivemind.dht.routing import DHTID
from hivemind.dht.storage import DictionaryDHTValue
from hivemind.p2p import P2P
from hivemind.proto import dht_pb2
from hivemind.utils.serializer import MSGPackSerializer
from hivemind.utils.timed_storage import get_dht_time


def nested_tuple_subkey(depth: int) -> bytes:
    """msgpack of ((...(("leaf",),)...),) with ``depth`` tuples."""
    encoded = MSGPackSerializer.dumps("leaf")
    for _ in range(depth):
        encoded = msgpack.packb(msgpack.ExtType(0x40, b"\x91" + encoded))
    return encoded


def nested_dictionary_subkey(levels: int) -> bytes:
    """A DictionaryDHTValue used as a subkey (it is hashable), holding another as its only subkey, ``levels`` deep."""
    subkey: object = "leaf"
    for _ in range(levels):
        dictionary = DictionaryDHTValue()
        dictionary.store(subkey, b"\xc0", get_dht_time() + 3600)
        subkey = dictionary
    return MSGPackSerializer.dumps(subkey)


def test_subkey_that_fits_inside_a_dictionary_is_accepted():
    subkey = nested_tuple_subkey(MSGPackSerializer.MAX_NESTING_DEPTH - 3)
    assert check_subkey_bytes(subkey) is None
    dictionary = DictionaryDHTValue()
    dictionary.store(MSGPackSerializer.loads(subkey), b"\xc0", get_dht_time() + 60)
    assert len(MSGPackSerializer.loads(MSGPackSerializer.dumps(dictionary))) == 1


@pytest.mark.parametrize(
    "subkey",
    [
        nested_tuple_subkey(MSGPackSerializer.MAX_NESTING_DEPTH - 2),
        nested_dictionary_subkey(MSGPackSerializer.MAX_EXT_NESTING),
    ],
    ids=["62 tuples deep", "4 dictionaries deep"],
)
def test_subkey_that_decodes_alone_but_not_inside_a_dictionary_is_refused(subkey):
    MSGPackSerializer.loads(subkey)  # within the bounds on its own
    now = get_dht_time()
    assert check_store_item(DHTID.generate("key").to_bytes(), subkey, b"\xc0", now + 60, now) == "malformed_subkey"


@pytest.mark.timeout(60)
async def test_one_hostile_subkey_store_leaves_the_honest_entries_readable():
    victim = DHT(start=True)
    loop = asyncio.get_running_loop()
    reader = await loop.run_in_executor(None, lambda: DHT(initial_peers=victim.get_visible_maddrs(), start=True))
    attacker = await P2P.create(initial_peers=victim.get_visible_maddrs())
    try:
        expiration = get_dht_time() + 60
        assert await loop.run_in_executor(None, lambda: victim.store("shared", "honest", expiration, subkey="me"))
        hostile = nested_tuple_subkey(MSGPackSerializer.MAX_NESTING_DEPTH - 2)
        request = dht_pb2.StoreRequest(
            keys=[DHTID.generate("shared").to_bytes()],
            subkeys=[hostile],
            values=[MSGPackSerializer.dumps("hostile")],
            expiration_time=[expiration],
            peer=dht_pb2.NodeInfo(),
        )
        stub = DHTProtocol.get_stub(attacker, victim.peer_id)
        response = await asyncio.wait_for(stub.rpc_store(request), timeout=20)
        assert list(response.store_ok) == [False]
        found = await loop.run_in_executor(None, lambda: reader.get("shared", latest=True))
        assert found is not None and {subkey: item.value for subkey, item in found.value.items()} == {"me": "honest"}
    finally:
        await attacker.shutdown()
        reader.shutdown()
        victim.shutdown()
