"""
A map's text keys are hashed and interned as they are decoded (~0.4 us per entry), far more than the plain bytes
they are made of; the store rate limit weighs bytes that may start a text string accordingly, so a flood of values
made of maps with thousands of short string keys costs the receiving node a fraction of a second (0.3 s; 1.1 s before).
CPU time is measured (time.process_time), not wall time.
"""

import pytest
from dht_flood_helpers import flood_until_refused, store_request, victim_and_attacker

from hivemind.dht.protocol import DHTProtocol
from hivemind.dht.rate_limit import decode_cost
from hivemind.utils.serializer import MSGPackSerializer

pytestmark = pytest.mark.usefixtures("frozen_heap")  # CPU-time bounds: see conftest.frozen_heap


def string_keyed_map(index: int) -> bytes:
    """A value just under 4 KiB: a map of 380 distinct short string keys (not walked: its bytes are weighed)."""
    return MSGPackSerializer.dumps({f"{index:05x}{entry:03x}": 0 for entry in range(380)})


@pytest.mark.timeout(120)
async def test_a_flood_of_maps_with_many_string_keys_costs_a_fraction_of_a_second(p2p_factory):
    victim, attacker = await victim_and_attacker(p2p_factory)
    try:
        stub = DHTProtocol.get_stub(attacker, victim.p2p.peer_id)
        maps = lambda request_index: [string_keyed_map(request_index * 1000 + i) for i in range(1000)]  # noqa: E731
        spent, accepted = await flood_until_refused(stub, lambda index: store_request(maps(index)), 12)  # ~4 MiB each
        assert victim.rejected["rate_limited"] > 0 and accepted > 0
        assert spent < 0.6, f"{accepted} maps of 380 string keys stored, {spent:.2f} s of CPU"
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
    victim, attacker = await victim_and_attacker(p2p_factory)
    try:
        stub = DHTProtocol.get_stub(attacker, victim.p2p.peer_id)
        count = (1 << 20) - 8
        value = b"\xdd" + count.to_bytes(4, "big") + b"\x00" * count
        spent, accepted = await flood_until_refused(stub, lambda _: store_request([value] * 3), 40)  # ~3 MiB each
        assert victim.rejected["rate_limited"] > 0 and accepted > 0
        assert spent < 0.6, f"{accepted} arrays of a million zeros stored, {spent:.2f} s of CPU"
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
