"""DHTNode: store/get/bootstrap on real daemons, plus the node's pure rules (back-off, replication, merging)."""

import asyncio
import logging
import random
import time
from datetime import datetime, timedelta, timezone

import pytest
import pytest_asyncio
from dht_swarm import launch_swarm, shutdown_all

from hivemind.dht.blacklist import Blacklist
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.node import BOOTSTRAP_FAILED_MESSAGE, DHTNode
from hivemind.dht.protocol import ValidationError
from hivemind.dht.replication import should_replicate_to
from hivemind.dht.routing import DHTID
from hivemind.dht.search_state import KeySearch
from hivemind.dht.storage import DictionaryDHTValue
from hivemind.dht.validation import CompositeValidator
from hivemind.p2p import P2P
from hivemind.proto.auth_pb2 import AccessToken
from hivemind.utils.auth import TokenAuthorizerBase
from hivemind.utils.crypto import RSAPrivateKey
from hivemind.utils.serializer import MSGPackSerializer
from hivemind.utils.timed_storage import ValueWithExpiration, get_dht_time

# ---------------------------------------------------------------- pure rules


def test_blacklist_backs_off_exponentially_and_success_resets():
    now = [0.0]
    blacklist = Blacklist(base_time=5.0, backoff_rate=2.0, clock=lambda: now[0])
    assert [blacklist.register_failure("peer") for _ in range(3)] == [5.0, 10.0, 20.0]
    now[0] = 19.9
    assert "peer" in blacklist
    now[0] = 20.1
    assert "peer" not in blacklist and blacklist.num_failures("peer") == 3
    blacklist.register_success("peer")
    assert blacklist.register_failure("peer") == 5.0
    assert Blacklist(base_time=0).register_failure("peer") == 0 and "peer" not in Blacklist(base_time=0)


@pytest.mark.parametrize(
    "new_node, own_node, neighbors, expected",
    [
        (0b0001, 0b0011, [], True),  # no neighbours: always hand over
        (0b0001, 0b0011, [0b1000, 0b1100], True),  # new node would be a replica and we are the nearest holder
        (0b1110, 0b0011, [0b1000, 0b1100], False),  # new node is farther than every current replica
        (0b0001, 0b1111, [0b1000, 0b0010], False),  # another neighbour is nearer than us: it hands over
    ],
)
def test_replication_rule(new_node, own_node, neighbors, expected):
    assert should_replicate_to(0, new_node, own_node, neighbors) == expected


def test_key_search_keeps_newest_and_merges_dictionaries():
    search = KeySearch(DHTID.generate("key"), sufficient_expiration_time=100.0)
    assert not search.satisfied
    search.add_candidate(ValueWithExpiration(b"\x01", 50.0), DHTID(1))
    search.add_candidate(ValueWithExpiration(b"\x02", 40.0), DHTID(2))
    assert search.best == (b"\x01", 50.0) and not search.satisfied
    first, second = DictionaryDHTValue(), DictionaryDHTValue()
    first.store("a", b"\x01", get_dht_time() + 200)
    second.store("b", b"\x02", get_dht_time() + 300)
    search.add_candidate(ValueWithExpiration(first, first.latest_expiration_time), DHTID(3))
    search.add_candidate(ValueWithExpiration(second, second.latest_expiration_time), DHTID(4))
    assert set(dict(search.best.value.items())) == {"a", "b"} and search.satisfied
    assert search.sources == {DHTID(3), DHTID(4)}  # both contributed to the merged dictionary
    assert len(first) == 1  # inputs are not modified


# ---------------------------------------------------------------- a shared swarm of 10 nodes

pytestmark_swarm = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def swarm():
    nodes = await launch_swarm(10, cache_refresh_before_expiry=0)
    yield nodes
    await shutdown_all(nodes)


def unique_key(name: str) -> str:
    return f"{name}_{random.getrandbits(64):016x}"


@pytestmark_swarm
@pytest.mark.timeout(30)
async def test_swarm_nodes_know_each_other(swarm):
    # (every other node of the swarm: a node that a later-joining test started may be known too)
    for node in swarm:
        assert all(other.node_id in node.protocol.routing_table for other in swarm if other is not node)
        assert node.node_id not in node.protocol.routing_table


@pytestmark_swarm
@pytest.mark.timeout(30)
async def test_missing_key_returns_none(swarm):
    assert await swarm[3].get(unique_key("missing")) is None
    assert await swarm[3].get(unique_key("missing"), latest=True) is None


@pytestmark_swarm
@pytest.mark.timeout(30)
async def test_value_stored_by_one_node_is_found_by_others(swarm):
    key, expiration = unique_key("shared"), get_dht_time() + 60
    assert await swarm[1].store(key, ["some", ("value", 1)], expiration)
    for node in swarm:
        found = await node.get(key)
        assert isinstance(found, ValueWithExpiration) and found == (["some", ("value", 1)], expiration)
        value, found_expiration = found
        assert found[0] == value and found[1] == found_expiration == expiration


@pytestmark_swarm
@pytest.mark.timeout(30)
async def test_store_replicates_to_num_replicas_nearest_nodes(swarm):
    key = unique_key("replicated")
    assert await swarm[2].store(key, 1, get_dht_time() + 60)
    key_id = DHTID.generate(key)
    holders = {node.node_id for node in swarm if node.protocol.storage.get(key_id) is not None}
    nearest = sorted((node.node_id for node in swarm), key=key_id.xor_distance)[: swarm[0].num_replicas]
    assert holders == set(nearest)


@pytestmark_swarm
@pytest.mark.timeout(30)
async def test_none_is_a_legal_value(swarm):
    key, expiration = unique_key("none"), get_dht_time() + 60
    assert await swarm[0].store(key, None, expiration)
    assert await swarm[5].get(key) == ValueWithExpiration(None, expiration)


@pytestmark_swarm
@pytest.mark.timeout(30)
async def test_expired_store_is_rejected_and_nothing_is_stored(swarm):
    key = unique_key("expired")
    assert not await swarm[0].store(key, "old", get_dht_time() - 1)
    assert await swarm[4].get(key) is None


@pytestmark_swarm
@pytest.mark.timeout(30)
async def test_only_strictly_newer_expiration_replaces(swarm):
    key, now = unique_key("newer"), get_dht_time()
    assert await swarm[0].store(key, "first", now + 30)
    # rejections are checked from the storing node: it contacts the same replicas (the swarm may hold dead nodes of
    # other tests, which different nodes route around differently)
    assert not await swarm[0].store(key, "same expiration", now + 30)
    assert not await swarm[0].store(key, "older", now + 20)
    assert (await swarm[3].get(key, latest=True)).value == "first"
    assert await swarm[4].store(key, "newer", now + 40)
    assert (await swarm[5].get(key, latest=True)) == ("newer", now + 40)


@pytestmark_swarm
@pytest.mark.timeout(30)
async def test_latest_finds_the_newest_entry_among_peers(swarm):
    key, now = unique_key("latest"), get_dht_time()
    key_id = DHTID.generate(key)
    by_distance = sorted(swarm[1:], key=lambda node: key_id.xor_distance(node.node_id))
    old, new = MSGPackSerializer.dumps("old"), MSGPackSerializer.dumps("new")
    for node in by_distance[:3]:  # the nearest nodes hold an old entry, a farther one holds the newest
        node.protocol.storage.store(key_id, old, now + 30)
    by_distance[5].protocol.storage.store(key_id, new, now + 50)
    assert (await swarm[0].get(key)).value in ("old", "new")
    assert await swarm[0].get(key, latest=True) == ("new", now + 50)


@pytestmark_swarm
@pytest.mark.timeout(30)
async def test_subkeys_form_a_dictionary_with_independent_expirations(swarm):
    key, now = unique_key("dict"), get_dht_time()
    assert await swarm[0].store(key, "a", now + 30, subkey="first")
    assert await swarm[1].store(key, "b", now + 40, subkey=("second", 2))
    assert not await swarm[0].store(key, "rejected", now + 30, subkey="first")  # equal expiration
    # long enough to be found by the get below on a loaded machine (with 0.5 s from the first store, under load the
    # entry had expired before the get), then waited out
    short_expiration = get_dht_time() + 2.0
    assert await swarm[3].store(key, "short", short_expiration, subkey="short-lived")
    found = await swarm[4].get(key, latest=True)
    assert found.expiration_time == now + 40
    assert found.value == {
        "first": ValueWithExpiration("a", now + 30),
        ("second", 2): ValueWithExpiration("b", now + 40),
        "short-lived": ValueWithExpiration("short", short_expiration),
    }
    await asyncio.sleep(max(0.0, short_expiration - get_dht_time()) + 0.1)
    assert set((await swarm[5].get(key, latest=True)).value) == {"first", ("second", 2)}


@pytestmark_swarm
@pytest.mark.timeout(30)
async def test_regular_value_and_dictionary_replace_each_other_only_when_newer(swarm):
    key, now = unique_key("mixed"), get_dht_time()
    assert await swarm[0].store(key, "regular", now + 30)
    assert not await swarm[0].store(key, "entry", now + 20, subkey="s")
    assert await swarm[1].store(key, "entry", now + 40, subkey="s")
    assert (await swarm[2].get(key, latest=True)).value == {"s": ValueWithExpiration("entry", now + 40)}
    assert not await swarm[1].store(key, "regular again", now + 35)
    assert await swarm[3].store(key, "regular again", now + 45)
    assert await swarm[4].get(key, latest=True) == ("regular again", now + 45)


@pytestmark_swarm
@pytest.mark.timeout(30)
async def test_dictionary_entries_held_by_different_peers_are_merged(swarm):
    key, now = unique_key("merge"), get_dht_time()
    key_id = DHTID.generate(key)
    by_distance = sorted(swarm[1:], key=lambda node: key_id.xor_distance(node.node_id))
    by_distance[0].protocol.storage.store(key_id, MSGPackSerializer.dumps(1), now + 30, subkey="x")
    by_distance[1].protocol.storage.store(key_id, MSGPackSerializer.dumps(2), now + 35, subkey="y")
    found = await swarm[0].get(key, latest=True)
    assert found.value == {"x": ValueWithExpiration(1, now + 30), "y": ValueWithExpiration(2, now + 35)}


@pytestmark_swarm
@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "key, value",
    [
        (("tuple", "key"), ("a", ("nested", 1))),
        (42, [1, 2.5, "three"]),
        (b"raw bytes key", b"\x00\xff"),
        ("str", {"dict": [1, (2, 3)], 4: None}),
    ],
)
async def test_keys_and_values_round_trip_with_type_fidelity(swarm, key, value):
    expiration = get_dht_time() + 60
    assert await swarm[6].store(key, value, expiration)
    found = await swarm[7].get(key)
    assert found.value == value and type(found.value) is type(value)
    if isinstance(value, tuple):
        assert isinstance(found.value[1], tuple)


@pytestmark_swarm
@pytest.mark.timeout(30)
async def test_bytes_key_is_hashed_raw(swarm):
    suffix = unique_key("")
    key = "foo" + suffix
    assert await swarm[0].store(key, "bar", get_dht_time() + 60)
    assert (await swarm[1].get(MSGPackSerializer.dumps(key))).value == "bar"


@pytestmark_swarm
@pytest.mark.timeout(30)
async def test_remote_get_caches_the_value_locally(swarm):
    key, expiration = unique_key("cache"), get_dht_time() + 60
    key_id = DHTID.generate(key)
    assert await swarm[0].store(key, "cached", expiration, exclude_self=True)
    reader = next(node for node in swarm[1:] if node.protocol.storage.get(key_id) is None)
    assert (await reader.get(key)).value == "cached"
    assert reader.protocol.cache.get(key_id) == (MSGPackSerializer.dumps("cached"), expiration)


@pytestmark_swarm
@pytest.mark.timeout(30)
async def test_get_many_by_id_with_futures_and_reuse_of_requests(swarm):
    keys, expiration = [unique_key("future") for _ in range(3)], get_dht_time() + 60
    assert all((await swarm[0].store_many(keys, [1, 2, 3], expiration)).values())
    key_ids = list(map(DHTID.generate, keys))
    futures = await swarm[8].get_many_by_id(key_ids, return_futures=True)
    assert all(isinstance(future, asyncio.Future) for future in futures.values())
    assert [(await futures[key_id]).value for key_id in key_ids] == [1, 2, 3]
    concurrent = await asyncio.gather(*(swarm[9].get(keys[0], latest=True) for _ in range(5)))
    assert all(item.value == 1 for item in concurrent)


@pytestmark_swarm
@pytest.mark.timeout(30)
async def test_concurrent_gets_of_one_key_share_a_search(swarm):
    key_id = DHTID.generate(unique_key("shared-search"))
    first = await swarm[2].get_many_by_id([key_id], return_futures=True)
    second = await swarm[2].get_many_by_id([key_id], return_futures=True)  # default "now", a moment later
    (pending,) = swarm[2]._pending_gets[key_id]
    assert pending.futures == [first[key_id], second[key_id]]
    assert await first[key_id] is None and await second[key_id] is None


@pytestmark_swarm
@pytest.mark.timeout(30)
async def test_store_many_reports_per_key_and_subkey(swarm):
    key, now = unique_key("many"), get_dht_time()
    result = await swarm[1].store_many(
        [key, key, "other" + key], [1, 2, 3], [now + 30, now + 30, now - 1], subkeys=["a", "b", None]
    )
    assert result == {(key, "a"): True, (key, "b"): True, "other" + key: False}


@pytestmark_swarm
@pytest.mark.timeout(30)
async def test_find_nearest_nodes_is_ordered_and_includes_self(swarm):
    query = DHTID.generate()
    nearest = (await swarm[0].find_nearest_nodes([query], k_nearest=4))[query]
    expected = sorted((node.node_id for node in swarm), key=query.xor_distance)[:4]
    assert list(nearest) == expected
    assert swarm[0].node_id not in (await swarm[0].find_nearest_nodes([query], exclude_self=True))[query]


@pytestmark_swarm
@pytest.mark.timeout(30)
async def test_node_joining_late_finds_earlier_values(swarm):
    key, expiration = unique_key("late"), get_dht_time() + 60
    assert await swarm[0].store(key, "early", expiration)
    late = await DHTNode.create(initial_peers=await swarm[3].get_visible_maddrs())
    try:
        assert (await late.get(key)).value == "early"
    finally:
        await late.shutdown()


@pytestmark_swarm
@pytest.mark.timeout(30)
async def test_client_mode_node_uses_the_swarm_but_is_invisible(swarm):
    client = await DHTNode.create(initial_peers=await swarm[0].get_visible_maddrs(), client_mode=True)
    try:
        key, expiration = unique_key("client"), get_dht_time() + 60
        assert await client.store(key, "from client", expiration)
        assert (await swarm[4].get(key)).value == "from client"
        assert (await client.get(key)).value == "from client"
        assert client.protocol.storage.get(DHTID.generate(key)) is None  # a client is never a replica
        assert all(client.node_id not in node.protocol.routing_table for node in swarm)
        assert await swarm[0].protocol.call_ping(client.peer_id) is None  # it answers no RPCs
    finally:
        await client.shutdown()


# ---------------------------------------------------------------- single nodes and small swarms


@pytest.mark.timeout(30)
async def test_single_node_store_returns_local_acceptance():
    node = await DHTNode.create()
    try:
        now = get_dht_time()
        assert await node.store("key", 1, now + 30)
        assert not await node.store("key", 2, now + 20)
        assert await node.get("key") == (1, now + 30)
    finally:
        await node.shutdown()


@pytest.mark.timeout(30)
async def test_bootstrap_fails_when_no_initial_peer_answers():
    not_a_dht_peer = await P2P.create()  # reachable, but serves no DHT handlers, so pings fail
    try:
        initial_peers = await not_a_dht_peer.get_visible_maddrs()
        with pytest.raises(RuntimeError) as info:
            await DHTNode.create(initial_peers=initial_peers, wait_timeout=1)
        assert str(info.value) == BOOTSTRAP_FAILED_MESSAGE
        node = await DHTNode.create(initial_peers=initial_peers, wait_timeout=1, ensure_bootstrap_success=False)
        assert node.is_alive
        await node.shutdown()
    finally:
        await not_a_dht_peer.shutdown()


@pytest.mark.timeout(30)
async def test_initial_peer_without_peer_id_is_refused():
    with pytest.raises(ValueError, match="/p2p/"):
        await DHTNode.create(initial_peers=["/ip4/127.0.0.1/tcp/1234"])


async def _serve_modified_pings(node: DHTNode, modify) -> None:
    """Make ``node`` answer pings through ``modify(response)`` (a misbehaving bootstrap peer)."""
    protocol = node.protocol
    original = protocol.rpc_ping

    async def rpc_ping(request, context):
        return modify(await original(request, context))

    await protocol.remove_p2p_handlers(node.p2p)
    protocol.rpc_ping = rpc_ping
    await protocol.add_p2p_handlers(node.p2p)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("problem", ["clock_skew", "unreachable"])
async def test_strict_bootstrap_validation_fails_and_non_strict_warns(problem):
    bootstrap = await DHTNode.create()
    try:

        def modify(response):
            if problem == "clock_skew":
                response.dht_time += 10
            else:
                response.available = False
            return response

        await _serve_modified_pings(bootstrap, modify)
        initial_peers = await bootstrap.get_visible_maddrs()
        with pytest.raises(ValidationError):
            await DHTNode.create(initial_peers=initial_peers)
        lenient = await DHTNode.create(initial_peers=initial_peers, strict=False)
        assert len(lenient.protocol.routing_table) == 1
        await lenient.shutdown()
    finally:
        await bootstrap.shutdown()


@pytest.mark.timeout(60)
async def test_killed_peers_are_routed_around_and_blacklisted():
    nodes = await launch_swarm(8, wait_timeout=1)
    try:
        key, expiration = unique_key("survivor"), get_dht_time() + 60
        key_id = DHTID.generate(key)
        assert await nodes[0].store(key, "survives", expiration)
        holders = [node for node in nodes[1:] if node.protocol.storage.get(key_id) is not None]
        killed = holders[:2]
        for node in killed:
            await node.shutdown()
        reader = next(node for node in nodes if node not in killed and node.protocol.storage.get(key_id) is None)
        assert (await reader.get(key, latest=True)).value == "survives"
        assert any(node.peer_id in reader.blacklist for node in killed)
        assert all(node.node_id not in reader.protocol.routing_table for node in killed)
        assert await reader.store(unique_key("after"), 1, expiration)
    finally:
        await shutdown_all(nodes)


@pytest.mark.timeout(60)
async def test_signed_records_are_accepted_and_forgeries_rejected():
    owner_validator = RSASignatureValidator(RSAPrivateKey())
    nodes = await launch_swarm(3, record_validator=CompositeValidator([RSASignatureValidator(RSAPrivateKey())]))
    writer = await DHTNode.create(
        initial_peers=await nodes[0].get_visible_maddrs(), record_validator=CompositeValidator([owner_validator])
    )
    forger = await DHTNode.create(
        initial_peers=await nodes[0].get_visible_maddrs(),
        record_validator=CompositeValidator([RSASignatureValidator(RSAPrivateKey())]),
    )
    try:
        key, expiration = unique_key("signed"), get_dht_time() + 60
        subkey = b"data" + owner_validator.local_public_key
        assert await writer.store(key, "genuine", expiration, subkey=subkey, exclude_self=True)
        found = await nodes[1].get(key, latest=True)
        assert found.value == {subkey: ValueWithExpiration("genuine", expiration)}  # signature stripped

        # the forger uses the writer's owner tag but cannot sign for it: its own validator does not sign it
        assert not await forger.store(key, "forged", expiration + 10, subkey=subkey, exclude_self=True)
        assert (await nodes[2].get(key, latest=True)).value[subkey].value == "genuine"
        assert sum(node.protocol.rejected["invalid_record"] for node in nodes + [writer]) > 0
    finally:
        await shutdown_all(nodes + [writer, forger])


class MembersOnlyAuthorizer(TokenAuthorizerBase):
    """Grants a token to everyone who holds this authorizer; the token is valid only for the "member" user."""

    async def get_token(self) -> AccessToken:
        expiration = (datetime.now(timezone.utc) + timedelta(minutes=5)).isoformat()
        return AccessToken(username="member", public_key=self.local_public_key.to_bytes(), expiration_time=expiration)

    def is_token_valid(self, access_token: AccessToken) -> bool:
        return access_token.username == "member"

    def does_token_need_refreshing(self, access_token: AccessToken) -> bool:
        return False


@pytest.mark.timeout(60)
async def test_authorized_nodes_talk_and_outsiders_are_refused():
    nodes = await launch_swarm(2, authorizer=MembersOnlyAuthorizer(RSAPrivateKey()))
    try:
        key, expiration = unique_key("authorized"), get_dht_time() + 60
        assert await nodes[0].store(key, "members only", expiration, exclude_self=True)
        assert (await nodes[1].get(key)).value == "members only"
        with pytest.raises(RuntimeError, match="bootstrap failed"):
            await DHTNode.create(initial_peers=await nodes[0].get_visible_maddrs(), wait_timeout=1)
    finally:
        await shutdown_all(nodes)


@pytest.mark.timeout(30)
async def test_cached_value_served_locally_is_refreshed_before_it_expires():
    nodes = await launch_swarm(3, num_replicas=1, cache_refresh_before_expiry=1.0)
    try:
        key, now = unique_key("refresh"), get_dht_time()
        key_id = DHTID.generate(key)
        writer = nodes[0]
        assert await writer.store(key, "old", now + 2, exclude_self=True)
        reader = next(node for node in nodes[1:] if node.protocol.storage.get(key_id) is None)
        assert (await reader.get(key)).value == "old"  # found remotely, now cached
        assert (await reader.get(key)).value == "old"  # served from the cache: schedules a refresh at expiry - 1 s
        assert await writer.store(key, "new", now + 30, exclude_self=True)
        await asyncio.sleep(max(0.0, now + 1.5 - get_dht_time()))
        assert reader.protocol.cache.get(key_id) == (MSGPackSerializer.dumps("new"), now + 30)
    finally:
        await shutdown_all(nodes)


@pytest.mark.timeout(30)
async def test_stale_buckets_are_refreshed_with_lookups():
    nodes = await launch_swarm(2)  # these do not refresh, so they leave the refreshing node's buckets untouched
    refreshing = await DHTNode.create(initial_peers=await nodes[0].get_visible_maddrs(), refresh_timeout=0.2)
    try:
        routing_table = refreshing.protocol.routing_table
        started = get_dht_time()
        calls = []
        original_find = refreshing.protocol.call_find

        async def counting_find(peer, keys):
            calls.append(peer)
            return await original_find(peer, keys)

        refreshing.protocol.call_find = counting_find
        # a few refresh periods, or as long as a loaded machine's event loop takes to make them
        deadline = time.monotonic() + 10
        while not (calls and all(bucket.last_updated > started for bucket in routing_table.buckets)):
            assert time.monotonic() < deadline, f"no refresh of every bucket within 10 s ({len(calls)} lookups)"
            await asyncio.sleep(0.05)
        assert len(routing_table) == 2
    finally:
        await shutdown_all(nodes + [refreshing])


@pytest.mark.timeout(60)
async def test_a_client_mode_node_without_initial_peers_warns_that_it_stays_alone(caplog):
    # 1.1.12 keeps a client's records in its own storage too (a lone client-mode node stores and gets them); here a
    # client-mode node keeps none, so alone its store returned False and its get None without a word
    with caplog.at_level(logging.WARNING):
        lone = await DHTNode.create(client_mode=True)
    try:
        assert await lone.store("key", "value", get_dht_time() + 30) is False
        warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
        assert any("client_mode=True without initial_peers" in message for message in warnings), warnings
        assert any("Pass initial_peers=[...]" in message for message in warnings), warnings
    finally:
        await lone.shutdown()

    server = await DHTNode.create()
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        client = await DHTNode.create(client_mode=True, initial_peers=await server.get_visible_maddrs())
    try:
        assert await client.store("key", "value", get_dht_time() + 30) is True
        assert not [record for record in caplog.records if "without initial_peers" in record.getMessage()]
    finally:
        await client.shutdown()
        await server.shutdown()
