"""Our peer without listen addresses is reached through a circuit relay, with the original as relay or caller.

Only our peer can be the unreachable one: the original's daemon announces no relay address on 127.0.0.1 (see
docs/relays.md), so nobody could dial it through the relay here.
"""

import time

import pytest

from .conftest import ORIGINAL, OURS
from .harness import RemoteError

pytestmark = [pytest.mark.interop, pytest.mark.timeout(90)]

UNREACHABLE = dict(host_maddrs=[], no_listen=True, use_relay=True, use_auto_relay=True)


def wait_for_relay_maddrs(peer, relay_id: str, timeout: float = 20):
    deadline = time.monotonic() + timeout
    while True:
        found = [m for m in peer.call("p2p_visible_maddrs", latest=True) if f"/p2p/{relay_id}/p2p-circuit" in m]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


@pytest.mark.parametrize(
    "relay_side, caller_side", [(ORIGINAL, ORIGINAL), (ORIGINAL, OURS), (OURS, ORIGINAL)], ids=lambda side: side
)
def test_unreachable_peer_of_ours_is_called_through_relay(module_peers, relay_side, caller_side):
    tag = f"{relay_side}-{caller_side}"
    relay = module_peers(relay_side, f"relay-{tag}")
    relay_info = relay.call("p2p_create", force_reachability="public")
    unreachable = module_peers(OURS, f"unreachable-{tag}")
    unreachable_info = unreachable.call("p2p_create", initial_peers=relay_info["maddrs"], **UNREACHABLE)
    unreachable.call("p2p_serve")
    circuit_maddrs = wait_for_relay_maddrs(unreachable, relay_info["peer_id"])
    assert circuit_maddrs, "no relay address announced"

    caller = module_peers(caller_side, f"caller-{tag}")
    initial_peers = relay_info["maddrs"]
    if relay_side == ORIGINAL:
        # an original caller found no route through the original relay in 2 of 9 runs ("routing: not found" for 15 s;
        # the original relay lacks our relay's own record of circuit addresses, see docs/relays.md): with such a
        # relay, callers are given the circuit address instead of looking it up
        initial_peers = initial_peers + circuit_maddrs
    caller.call("p2p_create", initial_peers=initial_peers)
    # a caller that has just started may not yet route to the unreachable peer: retried as in tests/test_p2p_relay.py
    deadline, peer_id = time.monotonic() + 15, unreachable_info["peer_id"]
    while True:
        try:
            answer = caller.call("p2p_call", peer_id=peer_id, kind="unary", numbers=[7], timeout=10)
            break
        except RemoteError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.2)
    assert answer == 49
