"""When p2pd can listen on none of host_maddrs, the error names host_maddrs and what to pass instead (before: only
libp2p's 'cannot start the libp2p host: failed to listen on any addresses: [...]')."""

import re
import socket

import pytest

from hivemind.p2p import P2P, P2PDaemonError

pytestmark = pytest.mark.timeout(30)


async def test_an_address_of_another_machine_is_named_with_the_option():
    with pytest.raises(P2PDaemonError, match="host_maddrs.*/ip4/0.0.0.0/tcp/0") as info:
        await P2P.create(host_maddrs=["/ip4/192.0.2.123/tcp/0"])
    assert "cannot assign requested address" in str(info.value), "libp2p's own reason is still quoted"


async def test_a_taken_udp_port_is_named_with_the_option():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as busy:
        busy.bind(("127.0.0.1", 0))
        port = busy.getsockname()[1]
        with pytest.raises(P2PDaemonError, match=f"host_maddrs.*/ip4/127.0.0.1/udp/{port}/quic-v1"):
            await P2P.create(host_maddrs=[f"/ip4/127.0.0.1/udp/{port}/quic-v1"])


async def test_a_host_and_port_instead_of_a_multiaddr_is_answered_with_the_multiaddr_to_write():
    # it said only 'invalid multiaddr "127.0.0.1:5000" in host_maddrs: ... must begin with /'
    with pytest.raises(P2PDaemonError, match="host_maddrs takes multiaddrs such as /ip4/127.0.0.1/tcp/5000") as info:
        await P2P.create(host_maddrs=["127.0.0.1:5000"])
    assert "must begin with /" in str(info.value), "the daemon's own reason is still quoted"
    with pytest.raises(P2PDaemonError, match="announce_maddrs takes multiaddrs such as /ip4/0.0.0.0/tcp/31337"):
        await P2P.create(announce_maddrs=["example.org:31337"])


@pytest.mark.parametrize(
    "given, written",
    [
        ("[::1]:5000", "/ip6/::1/tcp/5000"),
        ("/ip4/127.0.0.1:5000", "/ip4/127.0.0.1/tcp/5000"),
        ("localhost:5000", "/ip4/127.0.0.1/tcp/5000"),
        ("0.0.0.0", "/ip4/0.0.0.0/tcp/0"),
    ],
)
async def test_an_ipv6_host_a_port_in_the_ip4_part_or_a_bare_ip_are_answered_with_their_multiaddr(given, written):
    # they got the generic /ip4/0.0.0.0/tcp/31337
    with pytest.raises(P2PDaemonError, match=f"host_maddrs takes multiaddrs such as {re.escape(written)}$"):
        await P2P.create(host_maddrs=[given])
