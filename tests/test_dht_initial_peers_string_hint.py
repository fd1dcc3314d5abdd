"""initial_peers given as one string is refused; the error shows the list to pass, split at commas and spaces (a
multiaddr holds neither): "a, b" and "a b" (as hivemind-dht prints its --initial_peers) as well as "a,b"."""

import pytest

from hivemind import DHT

FIRST, SECOND = "/ip4/127.0.0.1/tcp/1/p2p/A", "/ip4/127.0.0.1/tcp/2/p2p/B"


@pytest.mark.parametrize("joined", [f"{FIRST}, {SECOND}", f"{FIRST} {SECOND}", f" {FIRST},{SECOND}, "])
def test_the_hint_lists_each_multiaddr_without_spaces(joined):
    with pytest.raises(TypeError) as info:
        DHT(initial_peers=joined, start=False)
    assert f"e.g. {[FIRST, SECOND]!r}, not a single string" in str(info.value)
