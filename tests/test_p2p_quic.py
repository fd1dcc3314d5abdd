"""QUIC: a handshake never crashes the listening daemon; draft-29 listen addresses ('/quic') are served as QUIC v1."""

import logging

import pytest

from hivemind.p2p.daemon_args import upgrade_quic_draft


def test_only_draft_quic_addresses_are_rewritten():
    addresses = ["/ip4/0.0.0.0/tcp/0", "/ip4/0.0.0.0/udp/0/quic", "/ip6/::/udp/5/quic-v1"]
    upgraded, replaced = upgrade_quic_draft(addresses)
    assert upgraded == ["/ip4/0.0.0.0/tcp/0", "/ip4/0.0.0.0/udp/0/quic-v1", "/ip6/::/udp/5/quic-v1"]
    assert replaced == ["/ip4/0.0.0.0/udp/0/quic"]
    assert upgrade_quic_draft(None) == (None, [])


@pytest.mark.timeout(30)
async def test_a_peer_given_only_a_draft_quic_address_listens_on_quic_v1(p2p_factory, caplog):
    # before: p2pd exited with "failed to listen on any addresses: [no transport for protocol]"
    with caplog.at_level(logging.WARNING):
        first = await p2p_factory(host_maddrs=["/ip4/127.0.0.1/udp/0/quic"])
    assert "draft-29" in caplog.text
    addresses = [str(maddr) for maddr in await first.get_visible_maddrs()]
    assert addresses and all("/quic-v1" in address for address in addresses), addresses
    second = await p2p_factory(initial_peers=await first.get_visible_maddrs())  # dialed over QUIC v1
    assert first.peer_id in {info.peer_id for info in await second.list_peers()}


@pytest.mark.timeout(30)
async def test_a_quic_handshake_does_not_crash_the_listening_daemon(p2p_factory):
    # before: p2pd built with Go 1.26 panicked ("crypto/tls bug: where's my session ticket?") when any peer completed a
    # QUIC handshake with it: one UDP handshake from anyone killed the node
    listener = await p2p_factory(host_maddrs=["/ip4/127.0.0.1/udp/0/quic-v1"])
    dialer = await p2p_factory(host_maddrs=["/ip4/127.0.0.1/udp/0/quic-v1"])
    await dialer._client.connect(listener.peer_id, await listener.get_visible_maddrs())
    assert listener.peer_id in {info.peer_id for info in await dialer.list_peers()}
    assert dialer.peer_id in {info.peer_id for info in await listener.list_peers()}  # the listener is still alive
