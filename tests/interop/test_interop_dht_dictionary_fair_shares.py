"""
A hostile peer that filled a key's dictionary on a node of ours (MAX_DICTIONARY_ENTRIES junk subkeys) made that node
refuse every later entry of the key, including those an original hivemind 1.1.12 peer declares there. A full
dictionary is now shared fairly among the peers storing in it (hivemind.dht.dictionary_shares): the original's
entries get in, and are what a reader finds once the original is gone.
"""

import asyncio
import pickle
import time
import uuid

import pytest

from hivemind.dht.protocol import DHTProtocol
from hivemind.dht.routing import DHTID
from hivemind.dht.storage import MAX_DICTIONARY_ENTRIES
from hivemind.p2p import P2P, PeerID
from hivemind.proto import dht_pb2
from hivemind.utils.serializer import MSGPackSerializer

from .conftest import ORIGINAL, OURS

pytestmark = [pytest.mark.interop, pytest.mark.timeout(180)]


def _dump(obj) -> str:
    return pickle.dumps(obj).hex()


async def _fill(maddrs, peer_id: str, key: str, expiration: float) -> int:
    """A hostile peer (no DHT of its own) stores MAX_DICTIONARY_ENTRIES junk subkeys under ``key``: how many held."""
    attacker = await P2P.create(initial_peers=maddrs)
    try:
        num = MAX_DICTIONARY_ENTRIES
        request = dht_pb2.StoreRequest(
            keys=[DHTID.generate(key).to_bytes()] * num,
            subkeys=[MSGPackSerializer.dumps(("junk", index)) for index in range(num)],
            values=[MSGPackSerializer.dumps("junk")] * num,
            expiration_time=[expiration] * num,
            peer=dht_pb2.NodeInfo(),
        )
        stub = DHTProtocol.get_stub(attacker, PeerID.from_base58(peer_id))
        return sum((await stub.rpc_store(request, timeout=60)).store_ok)
    finally:
        await attacker.shutdown()


def test_an_original_peers_entries_get_into_a_dictionary_one_peer_filled_on_our_node(module_peers):
    original, ours = module_peers(ORIGINAL, "fair-share-writer"), module_peers(OURS, "fair-share-holder")
    holder = ours.call("dht_create", timeout=60)
    key, now = f"ffn.{uuid.uuid4().hex[:8]}.", time.time()
    assert asyncio.run(_fill(holder["maddrs"], holder["peer_id"], key, now + 3600)) == MAX_DICTIONARY_ENTRIES
    writer = original.call("dht_create", initial_peers=holder["maddrs"], timeout=60)
    for coordinate in range(20):  # what an original server's declare_experts stores under a grid's prefix key
        assert original.call(
            "dht_store",
            handle=writer["handle"],
            key_pkl=_dump(key),
            value_pkl=_dump((f"{key}{coordinate}", writer["peer_id"])),
            subkey_pkl=_dump(coordinate),
            expiration=now + 120 + coordinate / 64,
            timeout=60,
        )
    # only our node can answer now: the writer is gone, the reader knows nobody else
    assert original.call("dht_shutdown", handle=writer["handle"], timeout=60)
    reader = ours.call("dht_create", initial_peers=holder["maddrs"], timeout=60)
    found = ours.call("dht_get", handle=reader["handle"], key_pkl=_dump(key), latest=True, timeout=60)
    assert found["found"]
    entries = pickle.loads(bytes.fromhex(found["value_pkl"]))
    assert len(entries) == MAX_DICTIONARY_ENTRIES
    assert {coordinate: entries[coordinate][0] for coordinate in range(20) if coordinate in entries} == {
        coordinate: (f"{key}{coordinate}", writer["peer_id"]) for coordinate in range(20)
    }
