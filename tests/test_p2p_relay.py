"""Peers that nobody can dial (behind NAT, or no_listen=True) are reached through a circuit relay v2 peer.

Every test starts a public relay peer, an unreachable peer (no listen addresses, use_auto_relay=True) that
bootstraps from it, and then a third peer that has never been connected to the unreachable one: that peer only
learns the relay address through the DHT and must go through the relay.
"""

import asyncio
import functools
import time
from typing import List

import pytest

import hivemind
from hivemind.p2p import P2P, P2PContext, P2PDaemonError
from hivemind.proto import runtime_pb2, test_pb2
from hivemind.utils.multiaddr import Multiaddr

pytestmark = pytest.mark.timeout(60)

LOCALHOST = ["/ip4/127.0.0.1/tcp/0"]
UNREACHABLE = dict(no_listen=True, host_maddrs=[], use_relay=True, use_auto_relay=True)
RELAY_WAIT = 20  # seconds for the unreachable peer to hold a reservation (it takes well under a second here)


def relay_addrs(maddrs: List[Multiaddr], relay: P2P) -> List[Multiaddr]:
    return [maddr for maddr in maddrs if f"/p2p/{relay.peer_id}/p2p-circuit" in str(maddr)]


async def wait_for_relay_addrs(peer: P2P, relay: P2P) -> List[Multiaddr]:
    """The peer's addresses through ``relay``, once its daemon announces them (the API offers no event for it)."""
    deadline = time.monotonic() + RELAY_WAIT
    while True:
        try:
            found = relay_addrs(await peer.get_visible_maddrs(latest=True), relay)
        except ValueError:  # no addresses at all yet
            found = []
        if found or time.monotonic() > deadline:
            return found
        await asyncio.sleep(0.1)


async def first_answer(call, timeout: float = 15):
    """``await call()`` retried until it answers: a peer that has just started may not have the DHT routing table it
    needs to find where the callee is (nor may the callee's relay address have reached the DHT yet)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await call()
        except P2PDaemonError:
            if time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.2)


async def square(request: test_pb2.TestRequest, context: P2PContext) -> test_pb2.TestResponse:
    return test_pb2.TestResponse(number=request.number**2)


@pytest.fixture
async def relayed_trio(p2p_factory):
    """(relay, unreachable, caller): the caller starts once the unreachable peer holds a reservation."""
    relay = await p2p_factory(force_reachability="public")
    unreachable = await p2p_factory(initial_peers=await relay.get_visible_maddrs(), **UNREACHABLE)
    assert await wait_for_relay_addrs(unreachable, relay), "the unreachable peer announced no relay address"
    caller = await p2p_factory(initial_peers=await relay.get_visible_maddrs())
    return relay, unreachable, caller


async def test_unreachable_peer_announces_addresses_through_relay(p2p_factory):
    relay = await p2p_factory(force_reachability="public")
    unreachable = await p2p_factory(initial_peers=await relay.get_visible_maddrs(), **UNREACHABLE)
    found = await wait_for_relay_addrs(unreachable, relay)
    assert found, f"no /p2p-circuit address within {RELAY_WAIT} s"
    for maddr in found:
        assert str(maddr).endswith(f"/p2p/{relay.peer_id}/p2p-circuit/p2p/{unreachable.peer_id}")


async def test_unary_call_reaches_unreachable_peer_through_relay(relayed_trio):
    relay, unreachable, caller = relayed_trio
    await unreachable.add_protobuf_handler("square", square, test_pb2.TestRequest)
    response = await first_answer(
        lambda: caller.call_protobuf_handler(
            unreachable.peer_id, "square", test_pb2.TestRequest(number=7), test_pb2.TestResponse
        )
    )
    assert response.number == 49
    connections = {info.peer_id: info.addrs for info in await caller.list_peers()}
    assert unreachable.peer_id in connections
    assert all("/p2p-circuit" in str(addr) for addr in connections[unreachable.peer_id]), "not a relayed connection"


async def test_unreachable_peer_answers_back_over_relayed_connection(relayed_trio):
    relay, unreachable, caller = relayed_trio
    await caller.add_protobuf_handler("square", square, test_pb2.TestRequest)
    await unreachable.add_protobuf_handler("square", square, test_pb2.TestRequest)
    await first_answer(
        lambda: caller.call_protobuf_handler(
            unreachable.peer_id, "square", test_pb2.TestRequest(number=2), test_pb2.TestResponse
        )
    )
    response = await unreachable.call_protobuf_handler(
        caller.peer_id, "square", test_pb2.TestRequest(number=-5), test_pb2.TestResponse
    )
    assert response.number == 25


async def test_relayed_connection_carries_more_than_libp2p_default_limit(relayed_trio):
    relay, unreachable, caller = relayed_trio
    payload = bytes(range(256)) * 4096  # 1 MiB per message; go-libp2p's default relay limit is 128 KiB in total

    async def echo(request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        return runtime_pb2.ExpertResponse(metadata=request.metadata)

    await unreachable.add_protobuf_handler("echo", echo, runtime_pb2.ExpertRequest)
    await first_answer(
        lambda: caller.call_protobuf_handler(
            unreachable.peer_id, "echo", runtime_pb2.ExpertRequest(), runtime_pb2.ExpertResponse
        )
    )
    for _ in range(3):
        response = await caller.call_protobuf_handler(
            unreachable.peer_id, "echo", runtime_pb2.ExpertRequest(metadata=payload), runtime_pb2.ExpertResponse
        )
        assert response.metadata == payload


async def test_trusted_relay_is_used_without_discovery(p2p_factory):
    relay = await p2p_factory(force_reachability="public")
    relay_maddrs = await relay.get_visible_maddrs()
    unreachable = await p2p_factory(initial_peers=relay_maddrs, trusted_relays=relay_maddrs, **UNREACHABLE)
    assert await wait_for_relay_addrs(unreachable, relay)
    caller = await p2p_factory(initial_peers=relay_maddrs)
    await unreachable.add_protobuf_handler("square", square, test_pb2.TestRequest)
    response = await first_answer(
        lambda: caller.call_protobuf_handler(
            unreachable.peer_id, "square", test_pb2.TestRequest(number=3), test_pb2.TestResponse
        )
    )
    assert response.number == 9


async def test_relay_is_found_through_dht_when_bootstrap_peer_does_not_relay(p2p_factory):
    bootstrap = await p2p_factory(use_relay=False)  # serves no relays
    bootstrap_maddrs = await bootstrap.get_visible_maddrs()
    relay = await p2p_factory(initial_peers=bootstrap_maddrs, force_reachability="public")
    await relay.wait_for_at_least_n_peers(1, attempts=100, delay=0.05)
    unreachable = await p2p_factory(initial_peers=bootstrap_maddrs, **UNREACHABLE)
    assert await wait_for_relay_addrs(unreachable, relay), "the relay was not found through the DHT"


async def test_relay_address_is_withdrawn_when_relay_leaves(p2p_factory):
    leaving = await p2p_factory(force_reachability="public")
    staying = await p2p_factory(initial_peers=await leaving.get_visible_maddrs(), force_reachability="public")
    initial_peers = await leaving.get_visible_maddrs() + await staying.get_visible_maddrs()
    unreachable = await p2p_factory(initial_peers=initial_peers, **UNREACHABLE)
    assert await wait_for_relay_addrs(unreachable, leaving) and await wait_for_relay_addrs(unreachable, staying)

    await leaving.shutdown()
    deadline = time.monotonic() + RELAY_WAIT
    while relay_addrs(await unreachable.get_visible_maddrs(latest=True), leaving):
        assert time.monotonic() < deadline, "the address through the relay that left is still announced"
        await asyncio.sleep(0.1)
    assert relay_addrs(await unreachable.get_visible_maddrs(latest=True), staying)


async def _node_id(dht: hivemind.DHT, node):
    return node.node_id


async def _ping(peer_id, dht: hivemind.DHT, node):
    return await node.protocol.call_ping(peer_id)


@pytest.mark.timeout(90)
async def test_dht_peer_pings_unreachable_dht_peer_through_relay():
    dhts = []
    try:
        dhts.append(hivemind.DHT(start=True, force_reachability="public", host_maddrs=LOCALHOST))
        relay_maddrs = dhts[0].get_visible_maddrs()
        dhts.append(hivemind.DHT(start=True, initial_peers=relay_maddrs, **UNREACHABLE))
        first, third = dhts
        relay_p2p, third_p2p = await first.replicate_p2p(), await third.replicate_p2p()
        assert await wait_for_relay_addrs(third_p2p, relay_p2p), "the unreachable DHT peer has no relay address"
        dhts.append(hivemind.DHT(start=True, initial_peers=relay_maddrs, host_maddrs=LOCALHOST))
        second = dhts[2]
        node_id = await asyncio.get_running_loop().run_in_executor(None, third.run_coroutine, _node_id)
        ping = functools.partial(_ping, third.peer_id)
        deadline = time.monotonic() + 15  # a just-started peer may not be able to route to the third at once
        while True:
            answer = await asyncio.get_running_loop().run_in_executor(None, second.run_coroutine, ping)
            if answer is not None or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        assert answer == node_id
    finally:
        for dht in reversed(dhts):
            dht.shutdown()
