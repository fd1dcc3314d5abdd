"""Mistakes with initial_peers: one string instead of a list, a peer that cannot be reached."""

import socket

import pytest

from hivemind.dht import DHT
from hivemind.p2p import P2PDaemonError

MADDR = "/ip4/127.0.0.1/tcp/1234/p2p/QmSoLnSGccFuZQJzRadHn95W2CrSFmZuTdDWP8HXaHca9z"


@pytest.mark.timeout(10)
@pytest.mark.parametrize("single", [MADDR, MADDR.encode()])
def test_single_string_initial_peers_asks_for_a_list(single):
    with pytest.raises(TypeError, match="list of multiaddrs"):
        DHT(initial_peers=single, start=False)


@pytest.mark.timeout(30)
def test_unreachable_initial_peer_error_says_which_and_why():
    with socket.socket() as probe:  # a port nobody listens on (closed again at once)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    peer_id = MADDR.rsplit("/", 1)[1]
    with pytest.raises(P2PDaemonError) as error_info:
        DHT(initial_peers=[f"/ip4/127.0.0.1/tcp/{port}/p2p/{peer_id}"], start=True)
    message = str(error_info.value)  # it said only "failed to connect to bootstrap peers"
    assert "failed to connect to bootstrap peers" in message, message
    assert f"127.0.0.1/tcp/{port}" in message and "connection refused" in message, message
    assert "\n" not in message, message


@pytest.mark.timeout(30)
@pytest.mark.parametrize("malformed", ["/ip4/127.0.0.1/tcp/abc/p2p/" + MADDR.rsplit("/", 1)[1], "127.0.0.1:1234"])
def test_malformed_initial_peer_is_called_invalid_not_missing_its_peer_id(malformed):
    # it said "must end with /p2p/<peer id>" even when the address had one and its port was the problem
    with pytest.raises(ValueError, match="is not a valid multiaddr") as error_info:
        DHT(initial_peers=[malformed], start=True)
    assert malformed in str(error_info.value) and "must end with" not in str(error_info.value)
