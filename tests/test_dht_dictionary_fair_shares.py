"""
A replica caps a key's dictionary at MAX_DICTIONARY_ENTRIES for all peers together, so one peer that stored 8192 junk
subkeys under a key that honest peers use as a dictionary (an expert grid's prefix key) made the replica refuse every
honest entry of that key ("dictionary_full") until the junk expired. A full dictionary is now shared fairly: a new
entry pushes out one of the peer holding the most entries, if that peer holds more than the sender will (see
hivemind/dht/dictionary_shares.py and docs/dht.md).
"""

import asyncio
import random
import time
from typing import List, Sequence

import pytest

from hivemind.dht import storage as storage_module
from hivemind.dht.node import DHTNode
from hivemind.dht.protocol import DHTProtocol
from hivemind.dht.routing import DHTID
from hivemind.dht.storage import MAX_DICTIONARY_BYTES, MAX_DICTIONARY_ENTRIES, DHTLocalStorage, DictionaryDHTValue
from hivemind.proto import dht_pb2
from hivemind.utils.serializer import MSGPackSerializer
from hivemind.utils.timed_storage import get_dht_time

PREFIX = "ffn.0."  # an expert grid's prefix key: subkey = the next coordinate, value = (uid, peer id)


def entry_value(coordinate: int) -> bytes:
    return MSGPackSerializer.dumps((f"{PREFIX}{coordinate}", "QmServerPeerId"))


def raw_store_request(key_id: DHTID, subkeys: Sequence, expiration: float) -> dht_pb2.StoreRequest:
    """What a hostile peer sends without any DHT code of its own: one item per subkey of one key."""
    return dht_pb2.StoreRequest(
        keys=[key_id.to_bytes()] * len(subkeys),
        subkeys=[MSGPackSerializer.dumps(subkey) for subkey in subkeys],
        values=[MSGPackSerializer.dumps("junk")] * len(subkeys),
        expiration_time=[expiration] * len(subkeys),
        peer=dht_pb2.NodeInfo(),
    )


async def fill(attacker_p2p, victim_peer_id, key_id: DHTID, subkeys: Sequence, expiration: float) -> List[bool]:
    stub = DHTProtocol.get_stub(attacker_p2p, victim_peer_id)
    response = await stub.rpc_store(raw_store_request(key_id, subkeys, expiration), timeout=60)
    return list(response.store_ok)


async def honest_protocol(p2p_factory, victim_maddrs) -> DHTProtocol:
    p2p = await p2p_factory(initial_peers=victim_maddrs)
    return await DHTProtocol.create(p2p, DHTID.generate(), 20, 5, 5, wait_timeout=60, client_mode=True)


async def declare(honest: DHTProtocol, victim_peer_id, key_id: DHTID, coordinates: Sequence[int], expiration: float):
    """An honest server's declarations under the prefix key (one store request, as DHTNode.store_many sends them)."""
    values = [entry_value(coordinate) for coordinate in coordinates]
    return await honest.call_store(victim_peer_id, [key_id] * len(values), values, expiration, list(coordinates))


def holders(victim: DHTProtocol, key_id: DHTID) -> dict:
    dictionary = victim.storage.get(key_id).value
    assert isinstance(dictionary, DictionaryDHTValue) and len(dictionary) == MAX_DICTIONARY_ENTRIES
    return dict(dictionary._shares.counts.amounts)


@pytest.fixture
async def victim(p2p_factory):
    protocol = await DHTProtocol.create(await p2p_factory(), DHTID.generate(), 20, 5, 5, wait_timeout=60)
    yield protocol
    await protocol.shutdown()


@pytest.mark.timeout(120)
async def test_one_peer_filling_a_dictionary_no_longer_locks_honest_peers_out(victim, p2p_factory):
    maddrs, key_id, expiration = await victim.p2p.get_visible_maddrs(), DHTID.generate(PREFIX), get_dht_time() + 600
    attacker = await p2p_factory(initial_peers=maddrs)
    junk = [("junk", index) for index in range(MAX_DICTIONARY_ENTRIES)]
    assert all(await fill(attacker, victim.p2p.peer_id, key_id, junk, expiration))
    honest = await honest_protocol(p2p_factory, maddrs)
    try:
        assert await declare(honest, victim.p2p.peer_id, key_id, range(10), expiration) == [True] * 10
        stored = victim.storage.get(key_id).value
        assert all(stored.get(coordinate).value == entry_value(coordinate) for coordinate in range(10))
        assert holders(victim, key_id) == {attacker.peer_id: MAX_DICTIONARY_ENTRIES - 10, honest.p2p.peer_id: 10}
        # the attacker cannot push the honest entries out again: it holds more than the honest peer
        assert not any(await fill(attacker, victim.p2p.peer_id, key_id, [("more", i) for i in range(50)], expiration))
        assert victim.rejected["dictionary_full"] == 50
        assert holders(victim, key_id)[honest.p2p.peer_id] == 10
        # nor by replacing them: those are the honest peer's subkeys, stored again only with a later expiration
        assert await declare(honest, victim.p2p.peer_id, key_id, range(10), expiration + 60) == [True] * 10
    finally:
        await honest.shutdown()


@pytest.mark.parametrize("num_honest", [4000, 5000])
@pytest.mark.timeout(120)
async def test_an_honest_large_server_keeps_at_least_half_against_one_hostile_identity(
    victim, p2p_factory, num_honest
):
    maddrs, key_id, expiration = await victim.p2p.get_visible_maddrs(), DHTID.generate(PREFIX), get_dht_time() + 600
    honest = await honest_protocol(p2p_factory, maddrs)
    attacker = await p2p_factory(initial_peers=maddrs)
    try:
        assert await declare(honest, victim.p2p.peer_id, key_id, range(num_honest), expiration) == [True] * num_honest
        junk = [("junk", index) for index in range(MAX_DICTIONARY_ENTRIES)]
        accepted = sum(await fill(attacker, victim.p2p.peer_id, key_id, junk, expiration + 3600))
        kept = min(num_honest, MAX_DICTIONARY_ENTRIES // 2)  # max-min fair: the attacker gets no more than it keeps
        assert accepted == MAX_DICTIONARY_ENTRIES - kept
        assert holders(victim, key_id) == {honest.p2p.peer_id: kept, attacker.peer_id: MAX_DICTIONARY_ENTRIES - kept}
        stored = victim.storage.get(key_id).value
        survivors = [coordinate for coordinate in range(num_honest) if stored.get(coordinate) is not None]
        assert survivors == list(range(num_honest - kept, num_honest))  # its earliest stored entries went first
        # renewing what it holds needs no room; what was pushed out stays out while the attacker holds as much
        renewed = await declare(honest, victim.p2p.peer_id, key_id, range(num_honest), expiration + 60)
        assert renewed == [coordinate in survivors for coordinate in range(num_honest)]
    finally:
        await honest.shutdown()


@pytest.mark.timeout(180)
async def test_many_hostile_identities_end_with_fair_shares_and_honest_entries_still_get_in(victim, p2p_factory):
    maddrs, key_id, expiration = await victim.p2p.get_visible_maddrs(), DHTID.generate(PREFIX), get_dht_time() + 600
    attackers = [await p2p_factory(initial_peers=maddrs) for _ in range(4)]
    for number, attacker in enumerate(attackers):
        junk = [(number, index) for index in range(MAX_DICTIONARY_ENTRIES)]
        accepted = sum(await fill(attacker, victim.p2p.peer_id, key_id, junk, expiration))
        # max-min fair: each pushes the others out while they hold more than it will (4096 4096, 2731 2731 2730, ...)
        assert accepted == [MAX_DICTIONARY_ENTRIES, 4096, 2730, 2048][number]
    shares = holders(victim, key_id)
    assert sorted(shares.values()) == [MAX_DICTIONARY_ENTRIES // 4] * 4
    # the store rate limit still applies to an identity that keeps storing (each refused or pushing out an entry)
    for _ in range(2):  # (a burst is 20 000 items, refilled at 2 000 per second)
        await fill(attackers[0], victim.p2p.peer_id, key_id, [("again", i) for i in range(19000)], expiration)
    assert victim.rejected["rate_limited"] >= 19000  # a request refused whole
    assert sorted(holders(victim, key_id).values()) == [MAX_DICTIONARY_ENTRIES // 4] * 4
    honest = await honest_protocol(p2p_factory, maddrs)
    try:
        assert await declare(honest, victim.p2p.peer_id, key_id, range(100), expiration) == [True] * 100
        shares = holders(victim, key_id)
        assert shares[honest.p2p.peer_id] == 100
        assert sum(shares[attacker.peer_id] for attacker in attackers) == MAX_DICTIONARY_ENTRIES - 100
        assert max(shares[attacker.peer_id] for attacker in attackers) <= MAX_DICTIONARY_ENTRIES // 4
    finally:
        await honest.shutdown()


@pytest.mark.timeout(120)
async def test_a_full_dictionary_is_handed_over_whole_and_honest_peers_still_get_in(p2p_factory):
    holder = await DHTNode.create()
    newcomer, honest, other = None, None, None
    try:
        maddrs, key_id, expiration = await holder.get_visible_maddrs(), DHTID.generate(PREFIX), get_dht_time() + 600
        honest = await honest_protocol(p2p_factory, maddrs)
        assert await declare(honest, holder.peer_id, key_id, range(100), expiration) == [True] * 100
        attacker = await p2p_factory(initial_peers=maddrs)
        junk = [("junk", index) for index in range(MAX_DICTIONARY_ENTRIES)]
        assert sum(await fill(attacker, holder.peer_id, key_id, junk, expiration)) == MAX_DICTIONARY_ENTRIES - 100
        newcomer = await DHTNode.create(initial_peers=maddrs)
        # with two nodes, the holder hands the key over to the newcomer: its whole dictionary, from the holder
        while newcomer.protocol.storage.get(key_id) is None or len(newcomer.protocol.storage.get(key_id).value) < (
            MAX_DICTIONARY_ENTRIES
        ):
            await asyncio.sleep(0.1)
        assert holders(newcomer.protocol, key_id) == {holder.peer_id: MAX_DICTIONARY_ENTRIES}
        assert newcomer.protocol.rejected["dictionary_full"] == 0
        # an honest peer's entries get in there too, pushing out entries of the holder (who handed over the most)
        other = await honest_protocol(p2p_factory, await newcomer.get_visible_maddrs())
        assert await declare(other, newcomer.peer_id, key_id, range(100, 110), expiration) == [True] * 10
        assert holders(newcomer.protocol, key_id) == {
            holder.peer_id: MAX_DICTIONARY_ENTRIES - 10,
            other.p2p.peer_id: 10,
        }
    finally:
        await asyncio.gather(*(protocol.shutdown() for protocol in (honest, other) if protocol is not None))
        await asyncio.gather(*(node.shutdown() for node in (holder, newcomer) if node is not None))


def test_the_byte_limit_is_shared_by_the_same_rule_and_a_refused_entry_pushes_nothing_out():
    storage, key_id, expiration = DHTLocalStorage(), DHTID.generate("bytes"), get_dht_time() + 600
    num_junk = 0
    while storage.store_subkey(key_id, num_junk, b"j" * 1000, expiration, owner="attacker"):
        num_junk += 1
    assert num_junk == MAX_DICTIONARY_BYTES // 1019  # 1000 bytes, a 1-3 byte subkey and 16 bytes of overhead each
    assert storage.store_subkey(key_id, "honest", b"h" * 50_000, expiration, owner="honest")
    dictionary = storage.get(key_id).value
    before = dict(dictionary._shares.nbytes.amounts)
    assert before["honest"] == 50_000 + 7 + 16 and dictionary.nbytes <= MAX_DICTIONARY_BYTES
    assert before["attacker"] > MAX_DICTIONARY_BYTES - 51_023 - 1019  # what it takes to fit, the earliest first
    assert [subkey for subkey in range(num_junk) if subkey in dictionary] == list(
        range(num_junk - len(dictionary) + 1, num_junk)
    )
    # 650 000 bytes for the honest peer would need more than the attacker holds beyond that: refused, nothing moved
    assert not storage.store_subkey(key_id, "large", b"h" * 600_000, expiration, owner="honest")
    assert dict(dictionary._shares.nbytes.amounts) == before
    assert storage.store_subkey(key_id, "large", b"h" * 400_000, expiration, owner="honest")
    after = dictionary._shares.nbytes.amounts
    # pushed out only what it needed, each from an attacker holding more than the honest peer would
    assert dictionary.nbytes <= MAX_DICTIONARY_BYTES and after["attacker"] + 1019 > after["honest"] == 450_045


def test_entries_stored_without_an_owner_are_never_pushed_out_and_expired_ones_are_forgotten():
    storage, now = DHTLocalStorage(), get_dht_time()
    local, key_id = DHTID.generate("local"), DHTID.generate("shared")
    for subkey in range(MAX_DICTIONARY_ENTRIES):
        assert storage.store_subkey(local, subkey, b"\xc0", now + 600)  # e.g. this node's cache of a find result
    assert not storage.store_subkey(local, "new", b"\xc0", now + 600, owner="peer")
    for subkey in range(MAX_DICTIONARY_ENTRIES):  # three in four expire soon
        assert storage.store_subkey(key_id, subkey, b"\xc0", now + (600 if subkey % 4 == 0 else 5), owner="soon")
    while storage.get(key_id).value.get(1) is not None:
        time.sleep(0.5)
    live = MAX_DICTIONARY_ENTRIES // 4
    assert storage.store_subkey(key_id, "new", b"\xc0", get_dht_time() + 600, owner="other")  # room: no push out
    shares = storage.get(key_id).value._shares
    assert dict(shares.counts.amounts) == {"soon": live, "other": 1} and len(shares) == live + 1  # (no leak)
    for subkey in range(MAX_DICTIONARY_ENTRIES - live - 1):
        assert storage.store_subkey(key_id, ("other", subkey), b"\xc0", get_dht_time() + 600, owner="other")
    assert storage.store_subkey(key_id, "third", b"\xc0", get_dht_time() + 600, owner="third")
    assert dict(shares.counts.amounts) == {"soon": live, "other": MAX_DICTIONARY_ENTRIES - live - 1, "third": 1}


def test_random_stores_keep_the_limits_the_bookkeeping_and_push_out_only_from_peers_holding_more(monkeypatch):
    """Random stores (4 owners and unowned ones; new, replacing and refused entries of sizes 1 B to 900 B) under small
    limits: after each, the limits hold, each owner's recorded entries and bytes are what it holds, a refused store
    changes nothing, and every entry pushed out was of another owner that held more entries or bytes than the
    sender then holds (unowned entries are never pushed out)."""
    monkeypatch.setattr(storage_module, "MAX_DICTIONARY_ENTRIES", 24)
    monkeypatch.setattr(storage_module, "MAX_DICTIONARY_BYTES", 2400)
    rng, pushed_out = random.Random(0), 0
    for _ in range(60):
        storage, key_id, base = DHTLocalStorage(), DHTID.generate("random"), get_dht_time() + 1000
        for _ in range(200):
            owner, subkey = rng.choice(["A", "B", "C", "D", None]), rng.randrange(60)
            value, expiration = b"x" * rng.choice([1, 5, 30, 100, 300, 900]), base + rng.randrange(50)
            held = storage.get(key_id)
            dictionary = held.value if held is not None else DictionaryDHTValue()
            shares = dictionary._shares
            before = dict(dictionary.data)
            counts_before = dict(shares.counts.amounts) if shares is not None else {}
            nbytes_before = dict(shares.nbytes.amounts) if shares is not None else {}
            owners_before = dict(shares.owner_of) if shares is not None else {}
            stored = storage.store_subkey(key_id, subkey, value, expiration, owner=owner)
            dictionary = storage.get(key_id).value
            assert len(dictionary) <= 24 and dictionary.nbytes <= 2400
            if not stored:
                assert dict(dictionary.data) == before
                continue
            shares = dictionary._shares
            if shares is not None:
                owned = {}
                for live in dictionary.data:
                    if shares.owner_of[live] is not None:
                        owned.setdefault(shares.owner_of[live], {})[live] = dictionary._entry_nbytes[live]
                assert owned == shares.held
                assert dict(shares.counts.amounts) == {peer: len(entries) for peer, entries in owned.items()}
                assert dict(shares.nbytes.amounts) == {peer: sum(entries.values()) for peer, entries in owned.items()}
            for victim in set(before) - set(dictionary.data):
                victim_owner, pushed_out = owners_before.get(victim), pushed_out + 1
                assert victim_owner is not None and victim_owner != owner
                assert counts_before[victim_owner] > shares.counts.amounts[owner] or (
                    nbytes_before[victim_owner] > shares.nbytes.amounts[owner]
                )
    assert pushed_out > 100  # (the stores did push entries out)


def test_a_peer_never_pushes_out_one_that_holds_only_as_much_as_it_will(monkeypatch):
    """Ties: an entry is pushed out only from a peer that holds more entries (bytes) than the sender will hold with its
    new entry; a store that needs more than that is refused, and nothing is pushed out for it."""
    monkeypatch.setattr(storage_module, "MAX_DICTIONARY_ENTRIES", 8)
    monkeypatch.setattr(storage_module, "MAX_DICTIONARY_BYTES", 2400)
    storage, expiration = DHTLocalStorage(), get_dht_time() + 600
    counted, sized = DHTID.generate("entries"), DHTID.generate("bytes")
    for subkey, owner in [(0, "A"), (1, "A"), (2, "A"), (3, "A"), (4, "B"), (5, "B"), (6, "B"), (7, None)]:
        assert storage.store_subkey(counted, subkey, b"", expiration, owner=owner)
    assert not storage.store_subkey(counted, 8, b"", expiration, owner="B")  # B would hold 4, as A does
    assert storage.store_subkey(counted, 8, b"", expiration, owner="C")  # C would hold 1, fewer than A's 4
    assert [subkey in storage.get(counted).value for subkey in range(4)] == [False, True, True, True]
    # each entry counts a 1-byte subkey, its value and 16 bytes of overhead
    for subkey, owner, size in [(0, "A", 400), (1, "A", 400), (2, "A", 400), (3, None, 1000)]:
        assert storage.store_subkey(sized, subkey, b"x" * (size - 17), expiration, owner=owner)
    # 800 bytes need two of A's entries, but after one A holds 800, as B would: refused, nothing pushed out
    assert not storage.store_subkey(sized, 4, b"x" * (800 - 17), expiration, owner="B")
    assert all(subkey in storage.get(sized).value for subkey in range(4))
    assert storage.store_subkey(sized, 4, b"x" * (799 - 17), expiration, owner="B")  # A holds 800 > 799 after one
    assert [subkey in storage.get(sized).value for subkey in range(5)] == [False, False, True, True, True]
    tied = DHTID.generate("tied")
    assert storage.store_subkey(tied, 0, b"x" * (1200 - 17), expiration, owner="A")
    assert storage.store_subkey(tied, 1, b"x" * (1000 - 17), expiration)
    assert not storage.store_subkey(tied, 2, b"x" * (1200 - 17), expiration, owner="C")  # C would hold A's 1200
    assert storage.store_subkey(tied, 2, b"x" * (1199 - 17), expiration, owner="C")
