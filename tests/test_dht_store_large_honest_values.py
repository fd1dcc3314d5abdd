"""
Values that decode into tens of thousands of objects (lists of pairs or tuples, token ids) cost more than a fresh
peer's store allowance, so every replica of ours refused them while 1.1.12 replicas store them. A peer whose allowance
is whole may now borrow for one request of a few items, up to a hard cap, and then waits until it has paid back; the
costliest values per item still take a fraction of a second of the receiving node's CPU (time.process_time). Lists
of short binary strings and of token ids were charged far above what decoding them costs; they are weighed closer.
Registered ext types other than tuples (decoded by their class's Python code) were charged as any ext, far below.
"""

import asyncio
import random

import msgpack
import pytest
from dht_flood_helpers import (
    flood_until_refused,
    least_cpu_in_turn,
    reference_int_entries,
    reference_int_values,
    store_request,
    timed_store,
    victim_and_attacker,
)

from hivemind.dht.node import DHTNode
from hivemind.dht.protocol import DHTProtocol
from hivemind.dht.rate_limit import (
    DEFAULT_BURST_ITEMS,
    DEFAULT_MAX_REQUEST_ITEMS,
    PeerRateLimiter,
    decode_cost,
    store_item_cost,
)
from hivemind.dht.routing import DHTID
from hivemind.dht.storage import DictionaryDHTValue
from hivemind.dht.store_fanout import SendPacer
from hivemind.utils.serializer import MSGPackSerializer
from hivemind.utils.tensor_descr import BatchTensorDescriptor
from hivemind.utils.timed_storage import get_dht_time

pytestmark = pytest.mark.usefixtures("frozen_heap")  # CPU-time bounds: see conftest.frozen_heap

RNG = random.Random(7)
MESSAGE_LIMIT = 4 * 1024 * 1024 - 4096  # what one request may carry, less room for framing
MANY_OBJECTS = {  # each costs more than a fresh peer's allowance (20 000 items)
    "45k float pairs": [[RNG.random(), RNG.random()] for _ in range(45_000)],
    "45k float tuples": [(RNG.random(), RNG.random()) for _ in range(45_000)],
    "45k (int, str) tuples": [(index, f"w{index}") for index in range(45_000)],
}
# the walk took one object per 512 bytes at most, gave up on this list and charged its random bytes as structure
BINARY_STRINGS = [RNG.randbytes(500) for _ in range(8000)]  # 4 MB: 149 000 items, 1 ms to decode
# an int's payload bytes may look like structure: these cost 64 000 items (38 ms to decode) before runs of ints
TOKEN_IDS = [RNG.randrange(50_257) for _ in range(1_000_000)]  # 3 MB
# a vocabulary above 65 536 mixes 16 and 32 bit ints, whose runs were weighed element by element: 64 000 items
MIXED_WIDTH_TOKEN_IDS = [RNG.randrange(128_000) for _ in range(800_000)]  # 3.2 MB
HONEST_VALUES = {
    **MANY_OBJECTS,
    "8000 binary strings of 500 bytes": BINARY_STRINGS,
    "1M token ids": TOKEN_IDS,
    "800k token ids of a 128k vocabulary": MIXED_WIDTH_TOKEN_IDS,
}


def test_limiter_lends_once_to_a_peer_holding_half_its_allowance_or_more():
    now = [0.0]
    limiter = PeerRateLimiter(burst=100, rate=10, clock=lambda: now[0], max_request=300)
    assert not limiter.allow("peer", 250)  # may not borrow: refused, nothing spent
    assert not limiter.allow("peer", 301, may_borrow=True)  # beyond the hard cap
    assert limiter.allow("peer", 250, may_borrow=True)  # borrows 150
    assert not limiter.allow("peer", 1, may_borrow=True)
    now[0] = 16.0  # paid back, 10 left: not whole again
    assert not limiter.allow("peer", 250, may_borrow=True)
    assert limiter.allow("peer", 1)
    now[0] = 40.0
    assert limiter.allow("peer", 300, may_borrow=True)
    now[0] = 80.0  # whole again
    assert limiter.allow("peer", 50) and limiter.allow("peer", 300, may_borrow=True)  # half of it is enough
    with pytest.raises(ValueError):
        PeerRateLimiter(burst=100, rate=10, max_request=50)


@pytest.mark.timeout(30)
async def test_the_sender_waits_until_a_replica_would_lend_again():
    pacer = SendPacer(burst=100, rate=1000, max_request=300)  # paces to 75 items and 750 items per second
    loop = asyncio.get_running_loop()
    started = loop.time()
    await pacer.wait("peer", 250)  # the replica's allowance is whole: it lends
    await pacer.wait("peer", 301)  # it would refuse this whatever the wait: sent at once, nothing counted
    assert loop.time() - started < 0.2
    await pacer.wait("peer", 250)  # 175 items owed, then the allowance whole again: 250 / 750 s
    assert loop.time() - started >= 0.3


def test_honest_values_cost_more_than_the_allowance_but_fit_the_cap():
    for name, value in MANY_OBJECTS.items():
        cost = store_item_cost(DHTProtocol.IS_REGULAR_VALUE, MSGPackSerializer.dumps(value))
        assert DEFAULT_BURST_ITEMS < cost <= DEFAULT_MAX_REQUEST_ITEMS, (name, cost)


def test_a_list_of_short_binary_strings_costs_like_its_bytes():
    encoded = MSGPackSerializer.dumps(BINARY_STRINGS)
    assert store_item_cost(DHTProtocol.IS_REGULAR_VALUE, encoded) < 2 * len(encoded) / 2048
    shorter = MSGPackSerializer.dumps([RNG.randbytes(130) for _ in range(30_000)])
    assert store_item_cost(DHTProtocol.IS_REGULAR_VALUE, shorter) < 2 * len(shorter) / 2048


def uint16_array(count: int) -> bytes:
    """An array of ``count`` random 16-bit ints, as msgpack encodes token ids (its payload looks like structure)."""
    return b"\xdd" + count.to_bytes(4, "big") + b"".join(b"\xcd" + RNG.randbytes(2) for _ in range(count))


def test_runs_of_ints_in_an_array_cost_like_their_bytes_but_not_in_a_map():
    encoded = MSGPackSerializer.dumps(TOKEN_IDS)
    assert store_item_cost(DHTProtocol.IS_REGULAR_VALUE, encoded) < 5 * len(encoded) / 2048  # 64 000 before
    # each key of a map is hashed and stored (~100 ns per entry): its ints are weighed by their bytes, as before
    entries = uint16_array(20_000)[5:]
    as_map = b"\xde" + (10_000).to_bytes(2, "big") + entries
    as_array = b"\xdc" + (20_000).to_bytes(2, "big") + entries
    assert decode_cost(as_map) > 10 * decode_cost(as_array)


@pytest.mark.timeout(120)
async def test_a_flood_of_int_arrays_costs_a_fraction_of_a_second(p2p_factory):
    victim, attacker = await victim_and_attacker(p2p_factory, stopped_clock=True)
    try:
        stub = DHTProtocol.get_stub(attacker, victim.p2p.peer_id)
        value = uint16_array(1_000_000)  # 3 MB, a million list elements (the most a value may hold): ~40 ms to decode
        flood = lambda: flood_until_refused(stub, lambda _: store_request([value]), 20)  # noqa: E731
        least, stored = await least_cpu_in_turn(victim, dict(arrays=flood, ints=reference_int_values(stub)))
        assert victim.rejected["rate_limited"] > 0 and stored["arrays"] >= 2
        # 1.5 times the CPU of the burst of ints (none was stored when their ints were weighed as structure)
        assert least["arrays"] < 2.5 * least["ints"], f"{stored['arrays']} arrays stored: {least}"
    finally:
        await victim.shutdown()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", list(HONEST_VALUES))
async def test_a_large_honest_value_reaches_every_remote_replica(name):
    first = await DHTNode.create()
    others = [await DHTNode.create(initial_peers=await first.get_visible_maddrs()) for _ in range(2)]
    storer, replicas = others[1], [first, others[0]]
    try:
        value = HONEST_VALUES[name]
        assert await storer.store(name, value, get_dht_time() + 600, exclude_self=True)
        for replica in replicas:
            stored = replica.protocol.storage.get(DHTID.generate(name))
            assert stored is not None and MSGPackSerializer.loads(stored.value) == value
            assert replica.protocol.rejected["rate_limited"] == 0
    finally:
        await asyncio.gather(*(node.shutdown() for node in [first, *others]))


@pytest.mark.timeout(60)
async def test_a_cache_push_never_borrows_so_the_pushing_peer_keeps_its_allowance(p2p_factory):
    victim, getter = await victim_and_attacker(p2p_factory)
    try:
        stub = DHTProtocol.get_stub(getter, victim.p2p.peer_id)
        large = MSGPackSerializer.dumps(MANY_OBJECTS["45k float pairs"])  # 32 000 items, stored by borrowing
        push = store_request([large])
        push.in_cache[:] = [True]  # a getter caching what it found (best effort) at the nearest peer that lacks it
        assert list((await stub.rpc_store(push, timeout=60)).store_ok) == [False]
        # its own store right after is not refused for the ~30 s that paying back a borrowed 32 000 items would take
        assert list((await stub.rpc_store(store_request([b"\x01"] * 3), timeout=60)).store_ok) == [True] * 3
        await asyncio.sleep(1.0)  # the refused push spent what its bytes cost (420 items, refilled in 0.21 s)
        assert list((await stub.rpc_store(store_request([large]), timeout=60)).store_ok) == [True]  # it may borrow
    finally:
        await victim.shutdown()


@pytest.mark.timeout(60)
async def test_a_large_value_right_after_many_small_items_is_stored(p2p_factory):
    victim, sender = await victim_and_attacker(p2p_factory)  # a sender without our pacing, as a 1.1.12 peer
    try:
        stub = DHTProtocol.get_stub(sender, victim.p2p.peer_id)
        # 8 000 items: its allowance is whole again only 4 s later (1 000 items: refused 40 ms later before)
        assert all((await stub.rpc_store(store_request([b"\x01"] * 8000), timeout=60)).store_ok)
        large = MSGPackSerializer.dumps(MANY_OBJECTS["45k float pairs"])  # 32 000 items, stored by borrowing
        assert list((await stub.rpc_store(store_request([large]), timeout=60)).store_ok) == [True]  # [False] before
        assert list((await stub.rpc_store(store_request([large]), timeout=60)).store_ok) == [False]  # in debt now
    finally:
        await victim.shutdown()


def tuples_of_empty_maps(count: int) -> bytes:
    """The costliest value per item we found: each tuple is a Python call, each map a new dict (~10 us per item)."""
    return MSGPackSerializer.dumps([({}, {}, {}) for _ in range(count)])


def string_keyed_map(count: int) -> bytes:
    """A map of short distinct string keys, each hashed and interned as it is decoded (~10 us per item)."""
    return MSGPackSerializer.dumps({f"{index:08x}": 0 for index in range(count)})


def empty_arrays(count: int) -> bytes:
    """An array of empty arrays: each a new list for the garbage collector to track (~6 us per item)."""
    return MSGPackSerializer.dumps([[] for _ in range(count)])


def nested_tuples(count: int) -> bytes:
    """Tuples four deep: four Python calls each (~5 us per item)."""
    return MSGPackSerializer.dumps([((((index,),),),) for index in range(count)])


def empty_dictionaries(count: int) -> bytes:
    """DictionaryDHTValue, a registered ext type: its class's unpackb checks each field (~16 us for an empty one)."""
    return MSGPackSerializer.dumps([DictionaryDHTValue() for _ in range(count)])


def tensor_descriptors(count: int) -> bytes:
    """BatchTensorDescriptor, another registered ext type (~16 us each)."""
    return MSGPackSerializer.dumps([BatchTensorDescriptor(index % 7 + 1) for index in range(count)])


COSTLIEST_VALUES = [
    tuples_of_empty_maps,
    string_keyed_map,
    empty_arrays,
    nested_tuples,
    empty_dictionaries,
    tensor_descriptors,
]


def test_a_registered_ext_type_costs_more_than_its_bytes_whether_walked_or_not():
    for count in (1, 100, 20_000):  # short, walked to the end, too many objects to walk
        assert decode_cost(empty_dictionaries(count)) >= 3 * count  # 0.8 per dictionary before
    as_tuples = MSGPackSerializer.dumps([() for _ in range(20_000)])  # an empty tuple decodes at C speed
    assert decode_cost(as_tuples) < decode_cost(empty_dictionaries(20_000)) / 3


def largest_under(make_value, cap: float) -> bytes:
    """The value ``make_value(count)`` nearly as large as fits in a message and costs at most ``cap`` items."""
    count = 1000
    for _ in range(3):  # cost and length grow in proportion to count
        value = make_value(count)
        scale = min(cap / store_item_cost(DHTProtocol.IS_REGULAR_VALUE, value), MESSAGE_LIMIT / len(value))
        count = int(count * scale * 0.99)
    value = make_value(count)
    assert store_item_cost(DHTProtocol.IS_REGULAR_VALUE, value) <= cap and len(value) <= MESSAGE_LIMIT
    return value


@pytest.mark.timeout(120)
@pytest.mark.parametrize("make_value", COSTLIEST_VALUES, ids=lambda make_value: make_value.__name__)
async def test_the_costliest_borrowed_request_takes_well_under_a_second(p2p_factory, make_value):
    victim, attacker = await victim_and_attacker(p2p_factory, stopped_clock=True)
    try:
        stub = DHTProtocol.get_stub(attacker, victim.p2p.peer_id)
        value = largest_under(make_value, DEFAULT_MAX_REQUEST_ITEMS - 1)

        async def borrowed_then_refused():
            spent, response = await timed_store(stub, store_request([value]))
            refused, second = await timed_store(stub, store_request([value]))  # in debt now: refused at once
            assert refused < 0.2, f"refusing it took {refused:.2f} s of CPU"  # ~2 ms
            return spent, (*response.store_ok, *second.store_ok)

        runs = dict(borrowed=borrowed_then_refused, ints=reference_int_values(stub))
        least, stored = await least_cpu_in_turn(victim, runs)
        # with the victim's clock running, a loaded machine refilled the debt of string_keyed_map's value (its bytes
        # bound its size) while the first was handled, and the second was stored (1 of 5 runs, 2 busy loops beside)
        assert stored["borrowed"] == (True, False) and victim.rejected["rate_limited"] == 3, stored
        # 0.5-2.4 times the CPU of the burst of ints (registered ext types weighed as any ext: 0.75-1.15 s, ~5 times)
        assert least["borrowed"] < 4.0 * least["ints"], f"one value of {len(value)} bytes: {least}"
    finally:
        await victim.shutdown()


def test_a_whole_dictionary_in_a_borrowing_request_borrows_down_to_its_floor():
    now = [0.0]
    limiter = PeerRateLimiter(burst=100, rate=10, clock=lambda: now[0], max_request=300)
    assert limiter.allow("peer", 250, may_borrow=True) and limiter.tokens("peer") == -150
    assert not limiter.allow_dictionary("peer", 1)  # a dictionary of another request: refused while in debt
    assert limiter.allow_dictionary("peer", 40, loan_floor=-200)  # 190 in debt, within the request's floor
    assert not limiter.allow_dictionary("peer", 20, loan_floor=-200)
    assert limiter.allow_dictionary(None, 1000)  # from this node itself: free


@pytest.mark.timeout(60)
async def test_a_whole_dictionary_beside_a_borrowed_value_is_stored(p2p_factory):
    victim, sender = await victim_and_attacker(p2p_factory)  # a handover of a few keys to a new peer, as 1.1.12 sends
    try:
        stub = DHTProtocol.get_stub(sender, victim.p2p.peer_id)
        large = MSGPackSerializer.dumps(MANY_OBJECTS["45k float pairs"])  # 32 000 items, stored by borrowing
        expiration = get_dht_time() + 600
        entries = [[index, b"\xc0", expiration] for index in range(10)]
        dictionary = MSGPackSerializer.dumps(msgpack.ExtType(0x50, msgpack.packb([float("inf"), expiration, entries])))
        request = store_request([large, dictionary])
        request.subkeys[1] = DHTProtocol.IS_DICTIONARY
        # the dictionary was charged after the value had put the sender in debt: [True, False] before
        assert list((await stub.rpc_store(request, timeout=60)).store_ok) == [True, True]
        assert victim.rejected["rate_limited"] == 0
    finally:
        await victim.shutdown()


@pytest.mark.timeout(60)
async def test_whole_dictionaries_of_a_borrowing_request_borrow_little_beyond_it(p2p_factory):
    """Storing a dictionary entry costs ~13 us of CPU while charged about one item (~6 us for values): a request
    that borrowed for a value and held 15 dictionaries of 2 500 entries stored 11 of them (27 500 entries, 24 000
    items borrowed beyond the value) and took 0.38 s of CPU, more than the costliest borrowed value alone."""
    victim, attacker = await victim_and_attacker(p2p_factory, stopped_clock=True)
    try:
        stub = DHTProtocol.get_stub(attacker, victim.p2p.peer_id)
        expiration = get_dht_time() + 600
        entries = [[index, b"\xc0", expiration] for index in range(2500)]
        dictionary = MSGPackSerializer.dumps(msgpack.ExtType(0x50, msgpack.packb([float("inf"), expiration, entries])))
        request = store_request([MSGPackSerializer.dumps(MANY_OBJECTS["45k float pairs"])] + [dictionary] * 15)
        request.subkeys[1:] = [DHTProtocol.IS_DICTIONARY] * 15

        async def borrowing():
            spent, response = await timed_store(stub, request)
            return spent, tuple(response.store_ok)

        least, stored = await least_cpu_in_turn(victim, dict(borrowing=borrowing, ints=reference_int_entries(stub)))
        assert stored["borrowing"][0] and sum(stored["borrowing"]) == 1, stored  # 12 stored before
        # 0.07 times the CPU of the burst of int entries (2.2 times, and 16 of 16 stored, when
        # its dictionaries could borrow to the cap)
        assert least["borrowing"] < 0.5 * least["ints"], least
    finally:
        await victim.shutdown()
