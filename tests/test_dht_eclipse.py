"""Node-id hijack: a peer that claims the DHT id of a live, known node does not take its place in routing tables."""

import asyncio
import itertools

import pytest
from dht_swarm import launch_swarm, shutdown_all

from hivemind.dht import protocol as dht_protocol
from hivemind.dht.node import DHTNode
from hivemind.dht.protocol import DHTProtocol
from hivemind.dht.routing import DHTID
from hivemind.p2p import P2P, P2PContext
from hivemind.proto import dht_pb2
from hivemind.utils.serializer import MSGPackSerializer
from hivemind.utils.timed_storage import get_dht_time


async def claim_id(attacker: P2P, target_peer, claimed_id: DHTID, method: str = "rpc_ping") -> None:
    """Send one request to ``target_peer`` that introduces the attacker under ``claimed_id`` (a forged NodeInfo)."""
    stub = DHTProtocol.get_stub(attacker, target_peer)
    forged = dht_pb2.NodeInfo(node_id=claimed_id.to_bytes())
    if method == "rpc_ping":
        await stub.rpc_ping(dht_pb2.PingRequest(peer=forged), timeout=5)
    else:
        key = DHTID.generate(f"attacker key {claimed_id}").to_bytes()
        value, expiration = MSGPackSerializer.dumps("junk"), get_dht_time() + 30
        request = dht_pb2.StoreRequest(
            keys=[key], subkeys=[b"\xc0"], values=[value], expiration_time=[expiration], peer=forged
        )
        await stub.rpc_store(request, timeout=5)


async def settle_claims(protocol: DHTProtocol) -> None:
    """Wait until every pending check of a claimed id has ended."""
    await asyncio.gather(*list(protocol._id_claim_checks.values()), return_exceptions=True)


@pytest.mark.timeout(60)
async def test_forged_id_claims_leave_lookups_and_values_with_the_honest_peers():
    nodes = await launch_swarm(4, num_replicas=1, cache_locally=False, cache_on_store=False)
    attacker = await P2P.create(initial_peers=await nodes[0].get_visible_maddrs())
    try:
        keys = [f"eclipse key {i}" for i in range(8)]
        expiration = get_dht_time() + 60
        for key in keys:
            assert await nodes[0].store(key, f"value of {key}", expiration)

        for target, victim in itertools.permutations(nodes, 2):
            for method in ("rpc_ping", "rpc_store"):
                await claim_id(attacker, target.peer_id, victim.node_id, method)
        for node in nodes:
            await settle_claims(node.protocol)

        for target, victim in itertools.permutations(nodes, 2):
            assert target.protocol.routing_table.get(node_id=victim.node_id) == victim.peer_id
            found = await target.find_nearest_nodes([victim.node_id], k_nearest=1, exclude_self=True)
            assert found[victim.node_id] == {victim.node_id: victim.peer_id}
        for key in keys:
            holder = next(node for node in nodes if node.protocol.storage.get(DHTID.generate(key)) is not None)
            reader = next(node for node in nodes if node is not holder)
            assert (await reader.get(key)).value == f"value of {key}"
    finally:
        await attacker.shutdown()
        await shutdown_all(nodes)


@pytest.mark.timeout(60)
async def test_id_of_a_silent_holder_goes_to_the_newcomer():
    nodes = await launch_swarm(2, wait_timeout=1)
    target, departed = nodes
    newcomer_p2p = await P2P.create(initial_peers=await target.get_visible_maddrs())
    # the target's short timeout only bounds its check of the departed holder; the newcomer's ping of the live target
    # must not time out on a loaded machine
    newcomer = await DHTProtocol.create(newcomer_p2p, departed.node_id, 20, 5, 5, wait_timeout=5)
    try:
        assert target.protocol.routing_table.get(node_id=departed.node_id) == departed.peer_id
        await departed.shutdown()  # its daemon is gone: a ping to it fails
        assert await newcomer.call_ping(target.peer_id) == target.node_id
        await settle_claims(target.protocol)
        assert target.protocol.routing_table.get(node_id=departed.node_id) == newcomer_p2p.peer_id
    finally:
        await newcomer.shutdown()
        await newcomer_p2p.shutdown()
        await shutdown_all(nodes)


@pytest.mark.timeout(60)
async def test_concurrent_claims_of_one_id_start_one_check():
    nodes = await launch_swarm(2)
    target, victim = nodes
    attacker = await P2P.create(initial_peers=await target.get_visible_maddrs())
    pinged, release = [], asyncio.Event()
    original_ping = target.protocol.call_ping

    async def held_ping(peer, *args, **kwargs):
        pinged.append(peer)
        await release.wait()  # keep the first check pending until every claim has been answered
        return await original_ping(peer, *args, **kwargs)

    target.protocol.call_ping = held_ping
    try:
        await asyncio.gather(*(claim_id(attacker, target.peer_id, victim.node_id) for _ in range(20)))
        assert list(target.protocol._id_claim_checks) == [victim.node_id]
        release.set()
        await settle_claims(target.protocol)
        assert pinged == [victim.peer_id]
        assert target.protocol.routing_table.get(node_id=victim.node_id) == victim.peer_id
    finally:
        await attacker.shutdown()
        await shutdown_all(nodes)


@pytest.mark.timeout(60)
async def test_lookup_keeps_the_known_peer_of_a_node_that_a_find_answer_maps_elsewhere():
    class DHTProtocol(dht_protocol.DHTProtocol):  # same name: served under the handler names honest nodes call
        async def rpc_find(self, forged: dht_pb2.FindRequest, ctx: P2PContext) -> dht_pb2.FindResponse:
            response = await super().rpc_find(forged, ctx)
            for result in response.results:  # forged: the victim's node id at the attacker's peer
                del result.nearest_node_ids[:], result.nearest_peer_ids[:]
                result.nearest_node_ids.append(victim.node_id.to_bytes())
                result.nearest_peer_ids.append(self.p2p.peer_id.to_bytes())
            return response

    searcher = await DHTNode.create(node_id=DHTID(2**159), wait_timeout=2)
    maddrs = await searcher.get_visible_maddrs()
    departed = await DHTNode.create(node_id=DHTID(2), initial_peers=maddrs)
    victim = await DHTNode.create(node_id=DHTID(3), initial_peers=maddrs)
    attacker_p2p = await P2P.create(initial_peers=maddrs)
    attacker = await DHTProtocol.create(attacker_p2p, DHTID(1), 20, 5, 5, wait_timeout=2)
    try:
        assert await attacker.call_ping(searcher.peer_id) == searcher.node_id  # the searcher knows all three now
        assert searcher.protocol.routing_table.get(node_id=victim.node_id) == victim.peer_id
        await departed.shutdown()
        # the search starts at the two nodes nearest to the query: the attacker, which names the victim's id at its
        # own peer, and a node that is gone; the victim takes the place of the latter
        found = await searcher.find_nearest_nodes([DHTID(0)], k_nearest=2, exclude_self=True)
        assert found[DHTID(0)] == {DHTID(1): attacker_p2p.peer_id, victim.node_id: victim.peer_id}
    finally:
        await attacker.shutdown()
        await attacker_p2p.shutdown()
        await shutdown_all([searcher, departed, victim])
