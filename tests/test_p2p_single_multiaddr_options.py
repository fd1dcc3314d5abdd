"""P2P.create (and the DHT, which forwards these options) refuses one multiaddr string where a list is expected:
it was split into characters, and p2pd failed on the multiaddr "/" without saying that a list was wanted."""

import pytest

from hivemind.dht import DHT
from hivemind.p2p import P2P
from hivemind.utils.multiaddr import Multiaddr

MADDR = "/ip4/127.0.0.1/tcp/0"


@pytest.mark.timeout(30)
@pytest.mark.parametrize("option", ["host_maddrs", "announce_maddrs", "trusted_relays", "initial_peers"])
@pytest.mark.parametrize("single", [MADDR, MADDR.encode(), Multiaddr(MADDR)], ids=["str", "bytes", "Multiaddr"])
async def test_p2p_create_refuses_a_single_multiaddr(option, single):
    with pytest.raises(TypeError, match=rf"{option} must be a list of multiaddrs.*pass \[.*127\.0\.0\.1"):
        await P2P.create(**{option: single})


def test_dht_refuses_a_single_host_multiaddr():
    with pytest.raises(TypeError, match=r"host_maddrs must be a list of multiaddrs"):
        DHT(start=True, host_maddrs=MADDR)


@pytest.mark.timeout(30)
async def test_lists_and_tuples_still_work(p2p_factory):
    p2p = await p2p_factory(host_maddrs=(MADDR,), announce_maddrs=None)
    assert await p2p.get_visible_maddrs()
