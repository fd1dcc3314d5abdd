"""DHT(initial_peers=<one string>) is refused with a TypeError that asks for a list of multiaddrs."""

import pytest

from hivemind.dht import DHT

MADDR = "/ip4/127.0.0.1/tcp/1234/p2p/QmSoLnSGccFuZQJzRadHn95W2CrSFmZuTdDWP8HXaHca9z"


@pytest.mark.timeout(10)
@pytest.mark.parametrize("single", [MADDR, MADDR.encode()])
def test_single_string_initial_peers_asks_for_a_list(single):
    with pytest.raises(TypeError, match="list of multiaddrs"):
        DHT(initial_peers=single, start=False)
