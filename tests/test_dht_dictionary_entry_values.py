"""
A whole dictionary's entry value that is not bytes (msgpack of a list, say) is refused once decoded, and is charged
what decoding it takes before it is decoded: reading the dictionary's layout unpacked it, charged nothing, so a
fresh peer's request of 4 dictionaries of one entry holding 300 000 ``[[]]`` (600 KB) took the receiver 1.73 s of CPU
(reading the layout ~0.34 s each, then decoding), charged ~8 items; now ~76 000 items each, refused in 0.04-0.05 s.
A whole dictionary's bytes are charged before its layout is read, as the rest of a store request's bytes are.
"""

import msgpack
import pytest
from dht_flood_helpers import store_request, timed_store, victim_and_attacker

from hivemind.dht.protocol import DHTProtocol
from hivemind.dht.rate_limit import DEFAULT_BURST_ITEMS, STORE_BYTES_PER_ITEM
from hivemind.dht.request_checks import dictionary_layout
from hivemind.dht.storage import DictionaryDHTValue
from hivemind.utils.serializer import MSGPackSerializer
from hivemind.utils.timed_storage import get_dht_time

pytestmark = pytest.mark.usefixtures("frozen_heap")  # CPU-time bounds: see conftest.frozen_heap


def dictionary_with_raw_values(raw_values, expiration: float) -> bytes:
    """An ext-0x50 dictionary whose entries i hold ``raw_values[i]`` spliced in as already-encoded msgpack."""
    entries = b"".join(
        b"\x93" + msgpack.packb(index) + raw + msgpack.packb(expiration) for index, raw in enumerate(raw_values)
    )
    header = b"\xdd" + len(raw_values).to_bytes(4, "big")
    payload = b"\x93" + msgpack.packb(None) + msgpack.packb(expiration) + header + entries
    return msgpack.packb(msgpack.ExtType(0x50, payload))


NESTED_LISTS = msgpack.packb([[[]]] * 300_000)  # 600 KB, 900 000 lists once unpacked


def test_an_entry_value_that_is_not_bytes_is_charged_as_its_bytes():
    expiration = get_dht_time() + 600
    honest = DictionaryDHTValue()
    honest.store(0, MSGPackSerializer.dumps([[[]]] * 300_000), expiration)
    _, honest_cost = dictionary_layout(MSGPackSerializer.dumps(honest))
    _, hostile_cost = dictionary_layout(dictionary_with_raw_values([NESTED_LISTS], expiration))
    # what decoding the same bytes costs, stored as bytes (the value of an honest entry) or not
    assert hostile_cost == pytest.approx(honest_cost) and hostile_cost > 20_000
    # a list of bytes entries costs what it did
    _, cost = dictionary_layout(dictionary_with_raw_values([msgpack.packb(b"\x01")] * 3, expiration))
    assert cost == pytest.approx(3 * 2 / 2048)  # a byte of subkey and a byte of value each, at 2 048 per item


@pytest.fixture(name="victim_and_attacker")
async def victim_and_attacker_fixture(p2p_factory):
    # what is refused must not depend on the wall time a loaded machine takes to handle a request: the victim's
    # limiter runs on a clock that moves only when told (see dht_flood_helpers.StoppedClock)
    victim, attacker = await victim_and_attacker(p2p_factory, stopped_clock=True)
    yield victim, attacker
    await victim.shutdown()


@pytest.mark.timeout(60)
async def test_a_fresh_peers_dictionaries_of_list_values_are_refused_before_they_are_decoded(victim_and_attacker):
    victim, attacker = victim_and_attacker
    dictionary = dictionary_with_raw_values([NESTED_LISTS], get_dht_time() + 600)
    request = store_request([dictionary] * 4, subkey=DHTProtocol.IS_DICTIONARY)
    spent, response = await timed_store(DHTProtocol.get_stub(attacker, victim.p2p.peer_id), request)
    assert list(response.store_ok) == [False] * 4
    # refused for what decoding them would take, not found malformed once decoded (1.73 s of CPU)
    assert victim.rejected["rate_limited"] == 4 and victim.rejected["malformed_dictionary"] == 0, victim.rejected
    assert spent < 0.5, f"{spent:.2f} s of CPU"


EMPTY_LISTS = b"\xdd" + (1_000_000).to_bytes(4, "big") + b"\x90" * 1_000_000  # 1 000 000 [] (1 MB)


@pytest.mark.timeout(60)
async def test_a_dictionarys_bytes_are_charged_before_its_layout_is_read(victim_and_attacker):
    """Reading a whole dictionary's layout weighs its entries' bytes (one entry value of 1 000 000 ``[]`` took ~3.5 ms
    of CPU), and it was charged one item per entry before that: a dictionary then refused for what decoding it costs
    left its sender ~2 items poorer per 1 MB the receiver read, so a fresh peer could make it read ~10 000 of them
    (~35 s of CPU) on one burst. Its bytes are now charged with its entries, at one item per 2 048 as a store
    request's other bytes."""
    victim, attacker = victim_and_attacker
    dictionary = dictionary_with_raw_values([msgpack.packb(EMPTY_LISTS)], get_dht_time() + 600)
    response = await DHTProtocol.get_stub(attacker, victim.p2p.peer_id).rpc_store(
        store_request([dictionary] * 2, subkey=DHTProtocol.IS_DICTIONARY), timeout=60
    )
    assert list(response.store_ok) == [False, False] and victim.rejected["rate_limited"] == 2, victim.rejected
    spent = DEFAULT_BURST_ITEMS - victim.store_rate_limiter.tokens(attacker.peer_id)
    assert spent >= 2 * len(dictionary) / STORE_BYTES_PER_ITEM, f"{spent:.0f} items for reading 2 MB"
