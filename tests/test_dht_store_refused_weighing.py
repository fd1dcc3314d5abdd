"""
Weighing a store request (rate_limit.decode_cost) takes up to ~40 ms of CPU per 4 MiB, and a request refused by the
store rate limit spent nothing: a peer could send costly requests that are refused back to back, each weighed anew.
A refused request now spends what its bytes cost at least (one item per 2 KiB, as far as the peer has tokens), and a
request whose bytes alone cost more than the peer may spend is refused before it is weighed.
CPU time is measured (time.process_time), not wall time.
"""

import pytest
from dht_flood_helpers import least_cpu_in_turn, reference_int_values, store_request, timed_store, victim_and_attacker

from hivemind.dht import protocol as protocol_module
from hivemind.dht.protocol import DHTProtocol
from hivemind.dht.rate_limit import DEFAULT_MAX_REQUEST_ITEMS, PeerRateLimiter, store_item_cost

pytestmark = pytest.mark.usefixtures("frozen_heap")  # CPU-time bounds: see conftest.frozen_heap

COUNT = (4 * 1024 * 1024 - 16384) // 3
COSTLY = b"\xdd" + COUNT.to_bytes(4, "big") + b"\x81\x00\x00" * COUNT  # an array of {0: 0}: walked to the end


def test_the_costly_value_is_refused_by_every_replica():
    assert store_item_cost(DHTProtocol.IS_REGULAR_VALUE, COSTLY) > DEFAULT_MAX_REQUEST_ITEMS


@pytest.mark.timeout(120)
async def test_a_flood_of_refused_requests_is_mostly_not_weighed(p2p_factory, monkeypatch):
    weighed = []
    monkeypatch.setattr(protocol_module, "store_item_cost", lambda *args: weighed.append(1) or store_item_cost(*args))
    victim, attacker = await victim_and_attacker(p2p_factory, stopped_clock=True)
    try:
        stub = DHTProtocol.get_stub(attacker, victim.p2p.peer_id)

        async def flood():  # 40 requests from a fresh peer: how many of them were weighed
            weighed.clear()
            spent = 0.0
            for _ in range(40):
                cpu, response = await timed_store(stub, store_request([COSTLY]))
                spent += cpu
                assert list(response.store_ok) == [False]
            return spent, len(weighed)

        least, outcome = await least_cpu_in_turn(victim, dict(refused=flood, ints=reference_int_values(stub)))
        assert victim.rejected["rate_limited"] == 3 * 40
        # the burst pays for weighing ten (20 000 items / 2 048), and the victim's clock does not move meanwhile
        assert outcome["refused"] <= 10, f"{outcome['refused']} of 40 refused requests were weighed"  # 40 before
        # 2.8 times the CPU of the burst of ints (1.04-1.16 s, ~6 times, when refused requests were all weighed)
        assert least["refused"] < 4.5 * least["ints"], least
    finally:
        await victim.shutdown()


def test_what_a_refused_request_spends_never_puts_a_peer_in_debt():
    now = [0.0]
    limiter = PeerRateLimiter(burst=100, rate=10, clock=lambda: now[0])
    assert limiter.fits("peer", 100) and not limiter.fits("peer", 101) and limiter.fits("peer", 300, may_borrow=True)
    limiter.spend_at_most("peer", 60)
    assert limiter.fits("peer", 40) and not limiter.fits("peer", 41)
    limiter.spend_at_most("peer", 60)  # only the 40 left
    now[0] = 1.0
    assert limiter.fits("peer", 10) and not limiter.fits("peer", 11)
