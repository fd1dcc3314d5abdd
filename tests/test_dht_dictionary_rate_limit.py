"""The store rate limit counts the entries of whole dictionaries, not one item per dictionary: four 8192-entry
dictionaries (half a megabyte) cost the storing node about a second of its event loop, and were charged four items."""

import msgpack
import pytest

from hivemind.dht.protocol import DHTProtocol
from hivemind.dht.rate_limit import PeerRateLimiter
from hivemind.dht.routing import DHTID
from hivemind.p2p import P2PContext
from hivemind.proto import dht_pb2
from hivemind.utils.timed_storage import get_dht_time

ENTRIES = 2048


def dictionary_bytes(num_entries: int, expiration: float) -> bytes:
    """An ext-0x50 dictionary of ``num_entries`` entries with int subkeys and msgpack-nil values."""
    entries = [[index, b"\xc0", expiration] for index in range(num_entries)]
    return msgpack.packb(msgpack.ExtType(0x50, msgpack.packb([float("inf"), expiration, entries], use_bin_type=True)))


def store_request(values: list, expiration: float) -> dht_pb2.StoreRequest:
    keys = [DHTID.generate().to_bytes() for _ in values]
    return dht_pb2.StoreRequest(
        keys=keys, subkeys=[b""] * len(values), values=values, expiration_time=[expiration] * len(values)
    )


@pytest.fixture
async def protocol(p2p_factory):
    protocol = await DHTProtocol.create(await p2p_factory(), DHTID.generate(), 20, 5, 5, wait_timeout=5)
    yield protocol
    await protocol.shutdown()


@pytest.mark.timeout(60)
async def test_whole_dictionaries_are_charged_per_entry(protocol):
    protocol.store_rate_limiter = PeerRateLimiter(burst=3 * ENTRIES, rate=1e-9)  # no refill during the test
    expiration = get_dht_time() + 600
    context = P2PContext("DHTProtocol.rpc_store", local_id=protocol.p2p.peer_id, remote_id=protocol.p2p.peer_id)
    request = store_request([dictionary_bytes(ENTRIES, expiration)] * 5, expiration)
    response = await protocol.rpc_store(request, context)
    assert list(response.store_ok) == [True, True, False, False, False]  # 3 * ENTRIES tokens: two fit, with items
    assert protocol.rejected["rate_limited"] == 3


@pytest.mark.timeout(60)
async def test_a_peer_without_tokens_left_gets_no_dictionary_decoded(protocol, monkeypatch):
    protocol.store_rate_limiter = PeerRateLimiter(burst=ENTRIES + 30, rate=1e-9)  # one dictionary (and its bytes)
    expiration = get_dht_time() + 600
    context = P2PContext("DHTProtocol.rpc_store", local_id=protocol.p2p.peer_id, remote_id=protocol.p2p.peer_id)
    first = await protocol.rpc_store(store_request([dictionary_bytes(ENTRIES, expiration)], expiration), context)
    assert list(first.store_ok) == [True]
    decoded = []
    original = protocol._decode_dictionary_entries
    monkeypatch.setattr(protocol, "_decode_dictionary_entries", lambda *args: decoded.append(1) or original(*args))
    response = await protocol.rpc_store(
        store_request([dictionary_bytes(ENTRIES, expiration)] * 2, expiration), context
    )
    assert list(response.store_ok) == [False, False] and decoded == []
