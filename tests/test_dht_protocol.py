"""DHTProtocol: the three RPCs between real daemons on 127.0.0.1, and the checks applied to hostile input."""

import math

import pytest

from hivemind.dht.protocol import DHTProtocol
from hivemind.dht.rate_limit import PeerRateLimiter
from hivemind.dht.request_checks import (
    MAX_EXPIRATION_HORIZON,
    RequestRejected,
    check_find_result_shape,
    check_store_item,
    check_store_request_shape,
)
from hivemind.dht.routing import DHTID
from hivemind.dht.storage import DictionaryDHTValue
from hivemind.p2p import P2P, P2PHandlerError
from hivemind.proto import dht_pb2
from hivemind.utils.serializer import MSGPackSerializer
from hivemind.utils.timed_storage import get_dht_time

KEY = DHTID.generate("key").to_bytes()
VALUE = MSGPackSerializer.dumps("value")


# ---------------------------------------------------------------- request checks (pure)


@pytest.mark.parametrize(
    "key, subkey, value, expiration_offset, reason",
    [
        (KEY, b"\xc0", VALUE, 10, None),
        (KEY[:10], b"\xc0", VALUE, 10, "bad_key_length"),
        (KEY, b"\xc0", VALUE, math.inf, "non_finite_expiration"),
        (KEY, b"\xc0", VALUE, math.nan, "non_finite_expiration"),
        (KEY, b"\xc0", VALUE, MAX_EXPIRATION_HORIZON + 100, "absurd_expiration"),
        (KEY, b"\xc0", b"\xdb\xff\xff\xff\xff", 10, "malformed_value"),  # str32 claiming 4 GiB
        (KEY, b"\xc0", b"", 10, "malformed_value"),
        (KEY, b"\xa3su", VALUE, 10, "malformed_subkey"),
        (KEY, b"\xa3sub\xc0", VALUE, 10, "malformed_subkey"),  # trailing bytes after the subkey
        (KEY, b"\xa3sub", VALUE, 10, None),
        (KEY, b"\xc0", VALUE + b"[signature:abc]", 10, None),  # validator suffixes follow the msgpack object
    ],
)
def test_store_item_checks(key, subkey, value, expiration_offset, reason):
    now = get_dht_time()
    assert check_store_item(key, subkey, value, now + expiration_offset, now) == reason


def test_misaligned_store_request_is_rejected():
    with pytest.raises(RequestRejected) as info:
        check_store_request_shape([KEY, KEY], [b"\xc0"], [VALUE, VALUE], [1.0, 2.0], [])
    assert info.value.reason == "misaligned_fields"
    check_store_request_shape([KEY], [b"\xc0"], [VALUE], [1.0], [])  # in_cache may be omitted


def test_find_result_with_misaligned_neighbours_is_rejected():
    with pytest.raises(RequestRejected):
        check_find_result_shape(0, 0.0, [KEY, KEY], [b"peer"], get_dht_time())
    with pytest.raises(RequestRejected):
        check_find_result_shape(1, math.inf, [], [], get_dht_time())


# ---------------------------------------------------------------- two protocols over real daemons


@pytest.fixture
async def two_protocols():
    p2p_a = await P2P.create()
    p2p_b = await P2P.create(initial_peers=await p2p_a.get_visible_maddrs())
    server = await DHTProtocol.create(p2p_a, DHTID.generate(), 20, 5, 5, wait_timeout=3)
    caller = await DHTProtocol.create(p2p_b, DHTID.generate(), 20, 5, 5, wait_timeout=3)
    yield server, caller
    for item in (caller, server, p2p_b, p2p_a):
        await item.shutdown()


@pytest.mark.timeout(30)
async def test_ping_returns_node_id_and_both_sides_learn_each_other(two_protocols):
    server, caller = two_protocols
    assert await caller.call_ping(server.p2p.peer_id, validate=True) == server.node_id
    assert caller.routing_table.get(node_id=server.node_id) == server.p2p.peer_id
    assert server.routing_table.get(node_id=caller.node_id) == caller.p2p.peer_id


@pytest.mark.timeout(30)
async def test_store_then_find_returns_value_and_expiration(two_protocols):
    server, caller = two_protocols
    key, expiration = DHTID.generate("key"), get_dht_time() + 30
    assert await caller.call_store(server.p2p.peer_id, [key], [VALUE], expiration) == [True]
    assert await caller.call_store(server.p2p.peer_id, [key], [VALUE], expiration) == [False]  # not newer
    found = await caller.call_find(server.p2p.peer_id, [key, DHTID.generate("missing")])
    value, neighbours = found[key]
    assert value == (VALUE, expiration) and neighbours == {}  # the requester itself is never returned
    assert found[DHTID.generate("missing")] == (None, {})


@pytest.mark.timeout(30)
async def test_subkeys_and_whole_dictionaries_round_trip(two_protocols):
    server, caller = two_protocols
    key, now = DHTID.generate("dict"), get_dht_time()
    assert await caller.call_store(server.p2p.peer_id, [key, key], [VALUE, VALUE], [now + 10, now + 20], ["a", "b"])
    value, _ = (await caller.call_find(server.p2p.peer_id, [key]))[key]
    assert isinstance(value.value, DictionaryDHTValue) and value.expiration_time == now + 20
    assert {subkey: tuple(item) for subkey, item in value.value.items()} == {
        "a": (VALUE, now + 10),
        "b": (VALUE, now + 20),
    }

    other_key = DHTID.generate("copy")  # a whole dictionary is stored entry by entry (replication, caching)
    assert await caller.call_store(server.p2p.peer_id, [other_key], [value.value], now + 20) == [True]
    assert server.storage.get(other_key).value.get("b") == (VALUE, now + 20)


@pytest.mark.timeout(30)
async def test_in_cache_items_go_to_the_cache_and_are_found(two_protocols):
    server, caller = two_protocols
    key, expiration = DHTID.generate("cached"), get_dht_time() + 30
    assert await caller.call_store(server.p2p.peer_id, [key], [VALUE], expiration, in_cache=True) == [True]
    assert server.storage.get(key) is None and server.cache.get(key) == (VALUE, expiration)
    assert (await caller.call_find(server.p2p.peer_id, [key]))[key][0] == (VALUE, expiration)


@pytest.mark.timeout(30)
async def test_client_mode_protocol_serves_nothing_and_is_not_added():
    p2p_a, p2p_b = await P2P.create(), None
    try:
        p2p_b = await P2P.create(initial_peers=await p2p_a.get_visible_maddrs())
        server = await DHTProtocol.create(p2p_a, DHTID.generate(), 20, 5, 5, wait_timeout=1)
        client = await DHTProtocol.create(p2p_b, DHTID.generate(), 20, 5, 5, wait_timeout=1, client_mode=True)
        assert await client.call_ping(p2p_a.peer_id) == server.node_id
        assert len(server.routing_table) == 0  # the client introduced itself with an empty node id
        assert await server.call_ping(p2p_b.peer_id) is None  # and it answers no RPCs
        await client.shutdown()
        await server.shutdown()
    finally:
        for p2p in (p2p_b, p2p_a):
            if p2p is not None:
                await p2p.shutdown()


@pytest.mark.timeout(30)
async def test_peer_that_stops_answering_is_removed_from_routing_table(two_protocols):
    server, caller = two_protocols
    await caller.call_ping(server.p2p.peer_id)
    assert server.node_id in caller.routing_table
    await server.shutdown()  # handlers removed: calls now fail
    assert await caller.call_find(server.p2p.peer_id, [DHTID.generate()]) is None
    assert server.node_id not in caller.routing_table


# ---------------------------------------------------------------- hostile requests through a raw stub


def raw_store(keys, subkeys, values, expirations, node_id=b""):
    return dht_pb2.StoreRequest(
        keys=keys, subkeys=subkeys, values=values, expiration_time=expirations, peer=dht_pb2.NodeInfo(node_id=node_id)
    )


@pytest.mark.timeout(30)
async def test_hostile_store_items_are_rejected_counted_and_valid_data_survives(two_protocols):
    server, caller = two_protocols
    stub = DHTProtocol.get_stub(caller.p2p, server.p2p.peer_id)
    key, now = DHTID.generate("victim"), get_dht_time()
    assert await caller.call_store(server.p2p.peer_id, [key], [VALUE], now + 30) == [True]

    hostile = raw_store(
        [key.to_bytes()] * 5 + [b"short"],
        [b"\xc0", b"\xc0", b"\xc0", b"\xa3su", b""] + [b"\xc0"],
        [b"\xdb\xff\xff\xff\xff", VALUE, VALUE, VALUE, b"\xc7\x01\x50\x00"] + [VALUE],
        [now + 60, math.inf, now + 10 * MAX_EXPIRATION_HORIZON, now + 60, now + 60] + [now + 60],
    )
    response = await stub.rpc_store(hostile)
    assert list(response.store_ok) == [False] * 6
    assert server.rejected == {
        "malformed_value": 1,
        "non_finite_expiration": 1,
        "absurd_expiration": 1,
        "malformed_subkey": 1,
        "malformed_dictionary": 1,
        "bad_key_length": 1,
    }
    assert server.storage.get(key) == (VALUE, now + 30)  # the valid entry was neither replaced nor lost


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "request_message, reason",
    [
        (raw_store([KEY, KEY], [b"\xc0"], [VALUE], [1.0]), "misaligned_fields"),
        (raw_store([KEY], [b"\xc0"], [VALUE], [1.0], node_id=b"not twenty bytes"), "bad_node_id"),
        (dht_pb2.FindRequest(keys=[b"\x00" * 19]), "bad_key_length"),
    ],
)
async def test_malformed_requests_get_an_error_and_are_counted(two_protocols, request_message, reason):
    server, caller = two_protocols
    stub = DHTProtocol.get_stub(caller.p2p, server.p2p.peer_id)
    method = stub.rpc_find if isinstance(request_message, dht_pb2.FindRequest) else stub.rpc_store
    with pytest.raises(P2PHandlerError):
        await method(request_message)
    assert server.rejected[reason] == 1
    assert await caller.call_ping(server.p2p.peer_id) == server.node_id  # the node still serves


def test_rate_limiter_refuses_bursts_and_refills():
    now = [0.0]
    limiter = PeerRateLimiter(burst=100, rate=10, clock=lambda: now[0])
    assert limiter.allow("peer", 60) and not limiter.allow("peer", 60)  # a refused request spends nothing
    assert limiter.allow("other", 100)  # buckets are per peer
    now[0] = 2.0
    assert limiter.allow("peer", 60) and not limiter.allow("peer", 1)


@pytest.mark.timeout(30)
async def test_store_flood_is_refused_and_counted_while_stored_data_survives(two_protocols):
    server, caller = two_protocols
    server.store_rate_limiter = PeerRateLimiter(burst=50, rate=1)
    key, now = DHTID.generate("flood-victim"), get_dht_time()
    assert await caller.call_store(server.p2p.peer_id, [key], [VALUE], now + 30) == [True]
    flood_keys = [DHTID.generate(f"flood {i}") for i in range(40)]
    results = [await caller.call_store(server.p2p.peer_id, flood_keys, [VALUE] * 40, now + 30) for _ in range(3)]
    assert results[0] == [True] * 40 and results[1] == results[2] == [False] * 40
    assert server.rejected["rate_limited"] == 80
    assert server.storage.get(key) == (VALUE, now + 30)


@pytest.mark.timeout(30)
async def test_malformed_find_response_counts_as_no_answer(two_protocols):
    server, caller = two_protocols

    async def hostile_find(request, context):
        response = dht_pb2.FindResponse(peer=dht_pb2.NodeInfo(node_id=server.node_id.to_bytes()))
        response.results.add(type=dht_pb2.FOUND_REGULAR, value=VALUE, expiration_time=math.inf)
        return response

    await server.remove_p2p_handlers(server.p2p)
    server.rpc_find = hostile_find
    await server.add_p2p_handlers(server.p2p)
    assert await caller.call_find(server.p2p.peer_id, [DHTID.generate("key")]) is None
    assert caller.rejected["non_finite_expiration"] == 1
    assert await caller.call_ping(server.p2p.peer_id) == server.node_id  # the caller keeps working
