"""
A map's text keys are hashed and interned as they are decoded (~0.4 us per entry), far more than the plain bytes
they are made of; the store rate limit weighs bytes that may start a text string accordingly, so a flood of values
made of maps with thousands of short string keys costs the receiving node about what a burst of ints does (1.1 s
before, ~6 times it). CPU time is measured (time.process_time), not wall time, and compared with that of a fresh peer's
burst of int values on the same victim (least of 3 runs in turn, its limiter's clock stopped: dht_flood_helpers).
"""

import functools

import pytest
from dht_flood_helpers import (
    flood_until_refused,
    least_cpu_in_turn,
    reference_int_values,
    store_request,
    victim_and_attacker,
)

from hivemind.dht.protocol import DHTProtocol
from hivemind.dht.rate_limit import decode_cost
from hivemind.utils.serializer import MSGPackSerializer

pytestmark = pytest.mark.usefixtures("frozen_heap")  # CPU-time bounds: see conftest.frozen_heap


def string_keyed_map(index: int) -> bytes:
    """A value just under 4 KiB: a map of 380 distinct short string keys (not walked: its bytes are weighed)."""
    return MSGPackSerializer.dumps({f"{index:05x}{entry:03x}": 0 for entry in range(380)})


@pytest.mark.timeout(120)
async def test_a_flood_of_maps_with_many_string_keys_costs_a_fraction_of_a_second(p2p_factory):
    victim, attacker = await victim_and_attacker(p2p_factory, stopped_clock=True)
    try:
        stub = DHTProtocol.get_stub(attacker, victim.p2p.peer_id)
        # ~4 MiB each, built once: every run sends the same requests
        requests = functools.cache(
            lambda index: store_request([string_keyed_map(index * 1000 + i) for i in range(1000)])
        )
        flood = lambda: flood_until_refused(stub, requests, 12)  # noqa: E731
        least, stored = await least_cpu_in_turn(victim, dict(maps=flood, ints=reference_int_values(stub)))
        # a fresh peer's allowance holds 1 000 of these maps (2 000 when their string keys' bytes cost as payload)
        assert victim.rejected["rate_limited"] > 0 and 0 < stored["maps"] <= 1000, stored
        # 1.13 times the CPU of the burst of ints, 2.05 times with their keys' bytes weighed as payload
        assert least["maps"] < 1.7 * least["ints"], f"{stored['maps']} maps: {least}"
    finally:
        await victim.shutdown()


def test_short_string_keys_weigh_more_than_their_bytes_and_honest_records_stay_cheap():
    assert decode_cost(string_keyed_map(0)) > 6  # 2 before; ~0.1 ms to decode
    record = {"peer_id": "12D3KooW" + "x" * 44, "state": 2, "throughput": 1234.5, "spans": [[0, 12], [12, 24]]}
    assert decode_cost(MSGPackSerializer.dumps(record)) < 1
    assert decode_cost(MSGPackSerializer.dumps([f"peer{index}" for index in range(1000)])) < 40


@pytest.mark.timeout(120)
async def test_a_flood_of_long_arrays_of_single_byte_ints_costs_a_fraction_of_a_second(p2p_factory):
    """1 MB of zeros in one array decodes into a million list elements (~25 ms), charged 512 items before: 1.05 s
    for a fresh peer's burst of them."""
    victim, attacker = await victim_and_attacker(p2p_factory, stopped_clock=True)
    try:
        stub = DHTProtocol.get_stub(attacker, victim.p2p.peer_id)
        count = (1 << 20) - 8
        value = b"\xdd" + count.to_bytes(4, "big") + b"\x00" * count
        flood = lambda: flood_until_refused(stub, lambda _: store_request([value] * 3), 40)  # noqa: E731 (~3 MiB each)
        least, stored = await least_cpu_in_turn(victim, dict(zeros=flood, ints=reference_int_values(stub)))
        # a fresh peer's allowance holds 9 of these arrays (36 when each zero weighed as a byte of payload)
        assert victim.rejected["rate_limited"] > 0 and 0 < stored["zeros"] <= 12, stored
        # 1.30 times the CPU of the burst of ints, 4.04 times when each zero weighed as a byte of payload
        assert least["zeros"] < 2.5 * least["ints"], f"{stored['zeros']} arrays: {least}"
    finally:
        await victim.shutdown()


def test_long_and_short_documents_weigh_their_bytes_alike():
    """Documents of 4 KiB or more are weighed by counting byte values in one pass, shorter ones by translate."""
    import random

    from hivemind.dht.rate_limit import _structure_weight

    rng = random.Random(5)
    for length in (0, 1, 100, 4095, 4096, 4097, 70_000):
        data = rng.randbytes(length)
        short = sum(_structure_weight(data[index : index + 1000]) for index in range(0, length, 1000))
        assert _structure_weight(data) == short, length
