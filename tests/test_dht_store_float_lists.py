"""
Honest values that are long lists of floats (a tensor's .tolist(), a loss history) must reach remote replicas: their
float bytes decode at C speed, yet the store rate limit charged each byte that looks like msgpack structure as
structure, so a list of 90000 floats (810 KB) cost more than a fresh peer's whole allowance and every replica of ours
refused it every time (hivemind 1.1.12 stores it). Runs of floats are recognised at C speed and weighed as payload
bytes that each become a Python float (three times a binary string's bytes: at one item per 2 KiB, a fresh peer's
burst of 1 MB float lists took 0.57-0.71 s of CPU); structure in disguise is weighed as before.
"""

import random

import pytest
from dht_flood_helpers import (
    flood_until_refused,
    least_cpu_in_turn,
    reference_int_values,
    store_request,
    victim_and_attacker,
)

from hivemind.dht.node import DHTNode
from hivemind.dht.protocol import DHTProtocol
from hivemind.dht.rate_limit import DEFAULT_BURST_ITEMS, decode_cost
from hivemind.dht.routing import DHTID
from hivemind.utils.serializer import MSGPackSerializer
from hivemind.utils.timed_storage import get_dht_time

pytestmark = pytest.mark.usefixtures("frozen_heap")  # CPU-time bounds: see conftest.frozen_heap

RNG = random.Random(0)
FLAT = [RNG.random() for _ in range(90000)]
ROWS = [[RNG.gauss(0, 1) for _ in range(300)] for _ in range(300)]


@pytest.mark.parametrize("value", [FLAT, ROWS, {"loss": FLAT[:20000], "step": 7}], ids=["flat", "rows", "map"])
def test_lists_of_floats_cost_three_times_their_bytes(value):
    encoded = MSGPackSerializer.dumps(value)  # 90 000 floats: 1 190 items (396 before), far below the burst
    assert 2.9 * len(encoded) / 2048 < decode_cost(encoded) < 3.6 * len(encoded) / 2048 + 10


def test_structure_among_floats_is_still_weighed():
    nested = [1.5] + [[[[[index]]]] for index in range(4000)]  # starts like a list of floats, holds nested arrays
    assert decode_cost(MSGPackSerializer.dumps(nested)) > 4000 * 4 * 256 / 2048 * 0.9
    disguised = [1.5] * 2 + [[[0.5]]] * 2000 + [1.5] * 8  # floats where a float list's stride expects them
    assert decode_cost(MSGPackSerializer.dumps(disguised)) > 2000 * 2 * 256 / 2048 * 0.9


@pytest.mark.timeout(60)
async def test_a_long_list_of_floats_reaches_the_remote_replica():
    first = await DHTNode.create()
    second = await DHTNode.create(initial_peers=await first.get_visible_maddrs())
    try:
        expiration = get_dht_time() + 600
        for name, value in {"flat": FLAT, "rows": ROWS}.items():
            assert await second.store(name, value, expiration, exclude_self=True), name
            stored = first.protocol.storage.get(DHTID.generate(name))
            assert stored is not None and MSGPackSerializer.loads(stored.value) == value, name
        assert first.protocol.rejected["rate_limited"] == 0
    finally:
        await second.shutdown()
        await first.shutdown()


@pytest.mark.timeout(120)
async def test_a_burst_of_float_lists_costs_a_fraction_of_a_second_of_cpu(p2p_factory):
    victim, attacker = await victim_and_attacker(p2p_factory, stopped_clock=True)
    try:
        value = MSGPackSerializer.dumps([RNG.random() for _ in range(110_000)])  # ~1 MB
        stub = DHTProtocol.get_stub(attacker, victim.p2p.peer_id)
        flood = lambda: flood_until_refused(stub, lambda _: store_request([value] * 3), 100)  # noqa: E731
        least, stored = await least_cpu_in_turn(victim, dict(floats=flood, ints=reference_int_values(stub)))
        assert stored["floats"] >= 3 and victim.rejected["rate_limited"] > 0
        # each float byte is charged three times a binary string's: 12 values stored (at once a string's: 39)
        assert stored["floats"] * 3 * len(value) / 2048 < DEFAULT_BURST_ITEMS, stored
        # 0.83 times the CPU of the burst of ints (2.34 times when float bytes cost a binary string's)
        assert least["floats"] < 1.6 * least["ints"], f"{stored['floats']} values stored: {least}"
    finally:
        await victim.shutdown()
