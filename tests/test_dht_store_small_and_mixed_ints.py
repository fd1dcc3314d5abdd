"""
Arrays of ints as the store rate limit weighs them (hivemind/dht/rate_limit.py): token ids of a vocabulary above
65 536 mix 16 and 32 bit ints, whose runs were weighed element by element like structure (500 000 ids: 39 900
items, stored by borrowing; 800 000 ids: 64 000 items, refused by every replica of ours, where 1.1.12 replicas store
them); they are now weighed by their bytes, a little more than a run of one width (each element's kind is a
mispredicted branch). Negative fixints below -5 each decode to a new Python int (CPython keeps -5..256 ready),
~35 ns where a byte was charged as ~20: a fresh peer's burst of arrays of them took ~0.6 s of the receiving node's
CPU; they now weigh four times a plain scalar byte. CPU time is measured (time.process_time), not wall time.
"""

import random
import time

import pytest
from dht_flood_helpers import (
    flood_until_refused,
    least_cpu_in_turn,
    reference_int_values,
    store_request,
    victim_and_attacker,
)

from hivemind.dht.protocol import DHTProtocol
from hivemind.dht.rate_limit import DEFAULT_BURST_ITEMS, decode_cost
from hivemind.utils.serializer import MSGPackSerializer

pytestmark = pytest.mark.usefixtures("frozen_heap")  # CPU-time bounds: see conftest.frozen_heap

RNG = random.Random(11)
MIXED_IDS = [RNG.randrange(128_000) for _ in range(500_000)]  # 2 MB of 16 and 32 bit ints


def test_runs_of_ints_of_mixed_widths_cost_like_their_bytes():
    encoded = MSGPackSerializer.dumps(MIXED_IDS)
    assert decode_cost(encoded) < 10 * len(encoded) / 2048 < DEFAULT_BURST_ITEMS  # 39 900 items before
    # each mixed element weighs more than in a run of one width, whatever its payload looks like
    same_width = MSGPackSerializer.dumps([RNG.randrange(256, 65536) for _ in range(500_000)])
    assert decode_cost(encoded) / len(encoded) > 1.5 * decode_cost(same_width) / len(same_width)
    light = MSGPackSerializer.dumps([RNG.choice((1, -60)) for _ in range(500_000)])  # payloads of no weight
    assert decode_cost(light) > 7 * len(light) / 2048  # int8 heads: 4 per byte before, ~33 ns per byte to decode


def test_the_walk_finds_the_structure_around_runs_of_mixed_widths():
    runs = [RNG.randrange(-40, 1 << 33) for _ in range(3000)]
    around = [runs, "tail", {"a": runs}, [runs[:40], [[[0]]] * 50], runs[:7], runs]
    walked_alone = decode_cost(MSGPackSerializer.dumps([runs] * 3))
    assert decode_cost(MSGPackSerializer.dumps(around)) > walked_alone + 50 * 2 * 256 / 2048  # the nested arrays
    assert decode_cost(MSGPackSerializer.dumps(around)) < 4 * walked_alone


def test_negative_fixints_weigh_more_than_plain_scalar_bytes():
    for value in ([-20] * 100, [RNG.randrange(-32, -5) for _ in range(500_000)], [[-20, None] * 8] * 1000):
        encoded = MSGPackSerializer.dumps(value)
        assert decode_cost(encoded) > 7 * len(encoded) / 2048, len(encoded)  # 4 per byte before
    cached = MSGPackSerializer.dumps([RNG.randrange(-5, 128) for _ in range(500_000)])
    assert decode_cost(cached) < 5 * len(cached) / 2048


def test_int8_runs_weigh_as_new_ints():
    """msgpack packs -128..-33 as int 8 (two bytes), each a new Python int: a run of them was weighed 4 per byte."""
    encoded = MSGPackSerializer.dumps([RNG.randrange(-128, -32) for _ in range(500_000)])
    assert decode_cost(encoded) > 8 * len(encoded) / 2048  # 4 per byte before, ~18 ns per byte to decode


def test_weighing_a_run_of_one_byte_scalars_of_mixed_kinds_is_as_fast_as_one_of_zeros():
    """Such a run was measured by bytes.lstrip of the 131 one-byte scalars, ~12 ns per byte: 50 ms per 4 MiB."""
    length = (4 << 20) - 5
    zeros = b"\xdd" + length.to_bytes(4, "big") + bytes(length)
    mixed = (
        b"\xdd" + length.to_bytes(4, "big") + bytes(RNG.choice(b"\x00\x05\xc0\xc2\xc3\xfb\xff") for _ in range(length))
    )

    def weighing(encoded: bytes) -> float:
        times = []
        for _ in range(3):
            started = time.process_time()
            decode_cost(encoded)
            times.append(time.process_time() - started)
        return min(times)

    # ~20 ms each now; 50 ms against 20 before
    assert weighing(mixed) < 1.6 * weighing(zeros) + 0.003


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "low, high, bound",
    [(-32, -5, 2.0), (-128, -32, 1.5)],  # fixints: 1 MB, ~35 ms to decode; int 8: 2 MB, ~37 ms
    ids=["negative fixints", "int8"],
)
async def test_a_burst_of_arrays_of_negative_fixints_costs_a_fraction_of_a_second(p2p_factory, low, high, bound):
    victim, attacker = await victim_and_attacker(p2p_factory, stopped_clock=True)
    try:
        stub = DHTProtocol.get_stub(attacker, victim.p2p.peer_id)
        value = MSGPackSerializer.dumps([RNG.randrange(low, high) for _ in range(1_000_000)])
        flood = lambda: flood_until_refused(stub, lambda _: store_request([value]), 40)  # noqa: E731
        least, stored = await least_cpu_in_turn(victim, dict(arrays=flood, ints=reference_int_values(stub)))
        # fixints: 0.15-0.19 s alone now (2 stored, 7 800 items each); 0.58-0.63 s before (11 stored, 1 953 items each)
        # int 8: 0.12-0.13 s alone now (2 stored, 9 800 items each); 0.30-0.40 s before (5 stored, 3 900 items each);
        # with the victim's clock stopped, what a fresh peer's allowance holds is exact and tells the charges apart
        assert victim.rejected["rate_limited"] > 0 and stored["arrays"] == 2, stored
        # a fresh peer's burst of int values takes ~0.16-0.19 s: CPU compared with it (least of 3 runs in turn), not
        # with a bound in seconds, which CPU contention on a loaded machine doubles
        assert least["arrays"] < bound * least["ints"], f"ints in [{low}, {high}): {least}"
    finally:
        await victim.shutdown()
