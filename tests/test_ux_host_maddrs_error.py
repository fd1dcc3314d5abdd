"""A malformed host_maddrs is reported under the option the user passed, not p2pd's internal flag name."""

import pytest

from hivemind.p2p import P2P
from hivemind.p2p.daemon_process import describe_output_line
from hivemind.p2p.p2p_daemon_bindings.utils import P2PDaemonError


@pytest.mark.timeout(30)
async def test_malformed_host_maddrs_error_names_the_option():
    with pytest.raises(P2PDaemonError) as error_info:
        await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/99999"])
    message = str(error_info.value)
    assert "host_maddrs" in message and "99999" in message
    assert "-hostAddrs" not in message


def test_other_flag_names_are_translated_too():
    line = "invalid multiaddr in -announceAddrs: bad; see -bootstrapPeers"
    assert describe_output_line(line) == "invalid multiaddr in announce_maddrs: bad; see initial_peers"


@pytest.mark.timeout(30)
async def test_port_of_a_running_peer_is_refused(p2p_factory):
    # go-libp2p listens with SO_REUSEPORT: a second peer on the same port started, and then each connection to the
    # port reached either of the two (peers that dialed the first one failed at random with a peer id mismatch)
    first = await p2p_factory(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    port = int((await first.get_visible_maddrs())[0].value_for_protocol("tcp"))
    with pytest.raises(P2PDaemonError) as error_info:
        await P2P.create(host_maddrs=[f"/ip4/127.0.0.1/tcp/{port}"])
    message = str(error_info.value)
    assert f"TCP port {port} is already in use" in message and "host_maddrs" in message, message
