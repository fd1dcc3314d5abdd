"""initial_peers may be the relay (/p2p-circuit) address of a peer that nobody can dial directly: the address its
get_visible_maddrs() (and hivemind-dht's start-up line) shows. The peer to join is the one after /p2p-circuit, or
the relay (which hivemind 1.1.12 pings): either may serve no DHT."""

import asyncio
import time

import pytest

from hivemind.dht.node import DHTNode, peer_id_from_maddr, peer_ids_to_ping
from hivemind.p2p import P2P
from hivemind.p2p.p2p_daemon_bindings.datastructures import PeerID
from hivemind.utils.networking import initial_peers_hint

pytestmark = pytest.mark.timeout(60)

RELAY_ID = "QmXxrcCsjcvghbGE4Rq9oaEjDBUChLoNwMsKbqwyRVuGez"
TARGET_ID = "QmTqYRN8kAWrRWL5uSYAUKStuztgmxGBc5EfJoysuR2jVa"
CIRCUIT = f"/ip4/127.0.0.1/tcp/31337/p2p/{RELAY_ID}/p2p-circuit/p2p/{TARGET_ID}"
UNREACHABLE = dict(no_listen=True, host_maddrs=[], use_relay=True, use_auto_relay=True)


def test_the_peer_of_a_relay_address_is_the_one_after_p2p_circuit():
    assert peer_id_from_maddr(CIRCUIT) == PeerID.from_base58(TARGET_ID)
    assert peer_id_from_maddr(f"/ip4/127.0.0.1/tcp/31337/p2p/{RELAY_ID}") == PeerID.from_base58(RELAY_ID)
    with pytest.raises(ValueError, match="must end with /p2p/<peer id>"):
        peer_id_from_maddr(f"/ip4/127.0.0.1/tcp/31337/p2p/{RELAY_ID}/p2p-circuit")


def test_the_initial_peers_hint_names_the_relayed_peer_not_its_relay():
    hint = initial_peers_hint([CIRCUIT], only_p2p=True)
    assert f"/p2p/{TARGET_ID}" in hint and RELAY_ID not in hint


async def _relay_addresses(peer: P2P, deadline: float):
    while time.monotonic() < deadline:
        try:
            found = [maddr for maddr in await peer.get_visible_maddrs(latest=True) if "p2p-circuit" in str(maddr)]
        except ValueError:  # no address at all yet
            found = []
        if found:
            return found
        await asyncio.sleep(0.1)
    raise AssertionError("the unreachable peer announced no relay address")


async def test_a_dht_node_joins_through_the_relay_address_of_an_unreachable_peer(p2p_factory):
    relay = await p2p_factory(force_reachability="public")  # a plain relay: it serves no DHT
    unreachable_p2p = await p2p_factory(initial_peers=await relay.get_visible_maddrs(), **UNREACHABLE)
    relayed_maddrs = await _relay_addresses(unreachable_p2p, time.monotonic() + 20)
    nodes = []
    try:
        nodes.append(await DHTNode.create(p2p=unreachable_p2p))
        # before: the bootstrap pinged the relay (the first /p2p/ of the address), which serves no DHT, and failed
        nodes.append(await DHTNode.create(initial_peers=relayed_maddrs, host_maddrs=["/ip4/127.0.0.1/tcp/0"]))
        assert unreachable_p2p.peer_id in nodes[1].protocol.routing_table.peer_id_to_uid
    finally:
        for node in reversed(nodes):
            await node.shutdown()


async def test_a_dht_node_joins_through_the_relay_when_the_peer_behind_it_serves_no_dht():
    # hivemind 1.1.12 pings the relay of such an address: a relay that runs a DHT lets a peer join through the address
    # of a client-mode peer behind it (before: only that peer was pinged, which serves no DHT: the bootstrap failed)
    relay = await DHTNode.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"], force_reachability="public")
    nodes = [relay]
    try:
        relay_maddrs = await relay.protocol.p2p.get_visible_maddrs()
        nodes.append(await DHTNode.create(initial_peers=relay_maddrs, client_mode=True, **UNREACHABLE))
        relayed_maddrs = await _relay_addresses(nodes[-1].protocol.p2p, time.monotonic() + 20)
        nodes.append(await DHTNode.create(initial_peers=relayed_maddrs, host_maddrs=["/ip4/127.0.0.1/tcp/0"]))
        assert relay.peer_id in nodes[-1].protocol.routing_table.peer_id_to_uid
    finally:
        for node in reversed(nodes):
            await node.shutdown()


def test_a_relay_address_names_both_the_peer_and_its_relay_to_ping():
    assert peer_ids_to_ping(CIRCUIT) == [PeerID.from_base58(TARGET_ID), PeerID.from_base58(RELAY_ID)]
    assert peer_ids_to_ping(f"/ip4/127.0.0.1/tcp/31337/p2p/{RELAY_ID}") == [PeerID.from_base58(RELAY_ID)]
    assert peer_ids_to_ping(f"/p2p-circuit/p2p/{TARGET_ID}") == [PeerID.from_base58(TARGET_ID)]  # no relay named
