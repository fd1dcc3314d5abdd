"""
A hostile peer that filled a key's dictionary on a node of ours (MAX_DICTIONARY_ENTRIES junk subkeys) made that node
refuse every later entry of the key, including those an original hivemind 1.1.12 peer declares there. A full
dictionary is now shared fairly among the peers storing in it (hivemind.dht.dictionary_shares): the original's
entries get in, and are what a reader finds once the original is gone.
"""

import asyncio
import functools
import pickle
import time
import uuid

import pytest

from hivemind.dht.protocol import DHTProtocol
from hivemind.dht.routing import DHTID
from hivemind.dht.storage import MAX_DICTIONARY_ENTRIES, DictionaryDHTValue
from hivemind.p2p import P2P, PeerID
from hivemind.proto import dht_pb2
from hivemind.utils.serializer import MSGPackSerializer

from .conftest import ORIGINAL, OURS

pytestmark = [pytest.mark.interop, pytest.mark.timeout(180)]


def _dump(obj) -> str:
    return pickle.dumps(obj).hex()


def _junk_request(key_id: DHTID, subkeys, value: bytes, expiration: float) -> dht_pb2.StoreRequest:
    return dht_pb2.StoreRequest(
        keys=[key_id.to_bytes()] * len(subkeys),
        subkeys=[MSGPackSerializer.dumps(subkey) for subkey in subkeys],
        values=[value] * len(subkeys),
        expiration_time=[expiration] * len(subkeys),
        peer=dht_pb2.NodeInfo(),
    )


async def _fill(maddrs, peer_id: str, key: str, expiration: float) -> int:
    """A hostile peer (no DHT of its own) stores MAX_DICTIONARY_ENTRIES junk subkeys under ``key``: how many held."""
    attacker = await P2P.create(initial_peers=maddrs)
    try:
        junk = [("junk", index) for index in range(MAX_DICTIONARY_ENTRIES)]
        request = _junk_request(DHTID.generate(key), junk, MSGPackSerializer.dumps("junk"), expiration)
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


async def _declarations_held(hostile: DHTProtocol, holder_id: PeerID, key_id: DHTID) -> dict:
    """What our holder itself answers for the grid's prefix key: {coordinate: ((uid, peer), expiration)}."""
    found = await hostile.call_find(holder_id, [key_id])
    dictionary = found[key_id][0].value
    return {
        subkey: (MSGPackSerializer.loads(item.value), item.expiration_time)
        for subkey, item in dictionary.items()
        if isinstance(subkey, int)
    }


def test_an_original_servers_renewed_declarations_stay_against_one_hostile_identity(module_peers):
    """An original server declares 20 experts under a grid prefix on our node, which one hostile identity filled, and
    renews them each period (as a server's declare_experts does) while that identity keeps storing there: new junk
    subkeys, its junk renewed with values large enough for the byte limit, a large single entry, a whole dictionary.
    The original's entries are all held by our node after every round: one identity never pushes them out."""
    original, ours = module_peers(ORIGINAL, "fair-share-renewer"), module_peers(OURS, "fair-share-renewed")
    holder = ours.call("dht_create", timeout=60)
    grid, now = f"e{uuid.uuid4().hex[:8]}", time.time()
    uids, prefix_id = [f"{grid}.0.{index}" for index in range(20)], DHTID.generate(f"{grid}.0.")
    holder_id = PeerID.from_base58(holder["peer_id"])

    async def scenario():
        loop = asyncio.get_running_loop()

        def on_original(cmd: str, **args):
            return loop.run_in_executor(None, functools.partial(original.call, cmd, timeout=60, **args))

        p2p = await P2P.create(initial_peers=holder["maddrs"])
        hostile = await DHTProtocol.create(p2p, DHTID.generate(), 20, 5, 5, wait_timeout=60, client_mode=True)
        stub = DHTProtocol.get_stub(p2p, holder_id)
        try:
            junk = [("junk", index) for index in range(MAX_DICTIONARY_ENTRIES)]
            filled = await stub.rpc_store(_junk_request(prefix_id, junk, b"\xa4junk", now + 3600), timeout=60)
            assert sum(filled.store_ok) == MAX_DICTIONARY_ENTRIES
            writer = await on_original("dht_create", initial_peers=holder["maddrs"])
            for period in range(4):
                expiration = now + 120 + 60 * period
                assert await on_original(
                    "dht_declare_experts", handle=writer["handle"], uids=uids, expiration=expiration
                )
                held = await _declarations_held(hostile, holder_id, prefix_id)
                assert held == {index: ((uid, writer["peer_id"]), expiration) for index, uid in enumerate(uids)}
                later = now + 3600 + period + 1
                news = [("new", period, index) for index in range(1000)]
                answers = [await stub.rpc_store(_junk_request(prefix_id, news, b"\xa4junk", later), timeout=60)]
                # junk renewed with larger values: up to the byte limit from the second period on
                big = MSGPackSerializer.dumps(b"j" * (400 + 50 * period))
                renewed = junk[1000 * period : 1000 * (period + 1)]
                answers.append(await stub.rpc_store(_junk_request(prefix_id, renewed, big, later), timeout=60))
                huge = [("huge", period)]
                huge_value = MSGPackSerializer.dumps(b"\xff" * 300_000)
                answers.append(await stub.rpc_store(_junk_request(prefix_id, huge, huge_value, later), timeout=60))
                replica = DictionaryDHTValue()
                for index in range(200):
                    replica.store(("replica", period, index), b"\xa4junk", later)
                whole = await hostile.call_store(holder_id, [prefix_id], [replica], later)  # as a replica hands over
                # whatever the hostile identity managed to store or replace, the original's declarations are all held
                assert not any(answers[0].store_ok) and not any(answers[2].store_ok) and whole == [False]
                held = await _declarations_held(hostile, holder_id, prefix_id)
                assert held == {index: ((uid, writer["peer_id"]), expiration) for index, uid in enumerate(uids)}
        finally:
            await hostile.shutdown()
            await p2p.shutdown()

    asyncio.run(scenario())
