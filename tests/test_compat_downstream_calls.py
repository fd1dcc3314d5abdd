"""Calls that downstream projects (petals 2.2.0, lightning-hivemind 0.1.0) make into hivemind, run the way their code
runs them, against real daemons: DHT.run_coroutine with coroutines that read the DHT and drive its DHTNode, and the
peer-to-peer helpers petals' reachability check and ping use."""

import asyncio
import math
import threading
from concurrent.futures import Future
from contextlib import asynccontextmanager
from functools import partial
from typing import Optional

import pytest

from hivemind.dht import DHT, DHTNode
from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker
from hivemind.p2p import P2P, P2PContext, PeerID, ServicerBase
from hivemind.proto import dht_pb2
from hivemind.utils import MPFuture, get_dht_time

# petals' options for the probe daemon of its reachability check
PROBE_ARGS = dict(dht_mode="client", use_relay=False, auto_nat=False, nat_port_map=False, no_listen=True)


async def _declare_active_modules(dht: DHT, node: DHTNode, uids, value, expiration_time):
    """petals.utils.dht._declare_active_modules: runs in the DHT process and reads dht.peer_id / dht.num_workers."""
    workers = min(len(uids), dht.num_workers or len(uids))
    return await node.store_many(
        keys=uids,
        subkeys=[dht.peer_id.to_base58()] * len(uids),
        values=[value] * len(uids),
        expiration_time=expiration_time,
        num_workers=workers,
    )


async def _get_remote_module_infos(dht: DHT, node: DHTNode, uids, expiration_time):
    workers = min(len(uids), dht.num_workers or len(uids))
    found = await node.get_many(uids, expiration_time, num_workers=workers)
    return {
        uid: None if entry is None else {s: v.value for s, v in entry.value.items()} for uid, entry in found.items()
    }


async def _own_identity(dht: DHT, node: DHTNode):
    return dht.peer_id, dht.client_mode, node.peer_id


async def _ping(peer_id, _dht: DHT, node: DHTNode, *, wait_timeout: float = 5):
    """petals.utils.ping.ping"""
    request = dht_pb2.PingRequest(peer=node.protocol.node_info)
    response = await node.protocol.get_stub(peer_id).rpc_ping(request, timeout=wait_timeout)
    return response.peer.node_id, response.dht_time


@pytest.fixture
def swarm():
    first = DHT(start=True, num_workers=4)
    second = DHT(initial_peers=first.get_visible_maddrs(), start=True)
    client = DHT(initial_peers=first.get_visible_maddrs(), start=True, client_mode=True)
    yield first, second, client
    for dht in (client, second, first):
        dht.shutdown()


@pytest.mark.timeout(60)
def test_a_run_coroutine_coroutine_reads_the_dht_identity_in_the_dht_process(swarm):
    first, second, client = swarm
    for dht in (first, client):
        peer_id, client_mode, node_peer_id = dht.run_coroutine(_own_identity)
        assert peer_id == node_peer_id == dht.peer_id
        assert client_mode is dht.client_mode is (dht is client)


@pytest.mark.timeout(60)
def test_petals_declares_and_finds_modules_through_run_coroutine(swarm):
    first, second, client = swarm
    expiration = get_dht_time() + 30
    declared = second.run_coroutine(
        partial(_declare_active_modules, uids=["block.0", "block.1"], value=(1, 2.5), expiration_time=expiration)
    )
    assert declared == {("block.0", second.peer_id.to_base58()): True, ("block.1", second.peer_id.to_base58()): True}

    future = client.run_coroutine(
        partial(_declare_active_modules, uids=["block.1"], value=(2,), expiration_time=expiration), return_future=True
    )
    assert isinstance(future, MPFuture)
    assert future.result(timeout=30) == {("block.1", client.peer_id.to_base58()): True}

    found = first.run_coroutine(
        partial(_get_remote_module_infos, uids=["block.0", "block.1", "block.2"], expiration_time=math.inf)
    )
    assert found == {
        "block.0": {second.peer_id.to_base58(): (1, 2.5)},
        "block.1": {second.peer_id.to_base58(): (1, 2.5), client.peer_id.to_base58(): (2,)},
        "block.2": None,
    }


@pytest.mark.timeout(60)
def test_petals_pings_a_peer_through_its_dht_protocol(swarm):
    first, second, _client = swarm
    node_id, dht_time = first.run_coroutine(partial(_ping, second.peer_id))
    assert len(node_id) == 20 and abs(dht_time - get_dht_time()) < 10


class ReachabilityProtocol(ServicerBase):
    """petals.server.reachability.ReachabilityProtocol: a servicer without ServicerBase.__init__, served on a replica
    of the DHT's daemon from a thread of its own, that answers through a second, non-listening probe daemon."""

    def __init__(self, *, probe: Optional[P2P] = None, wait_timeout: float = 5.0):
        self.probe, self.wait_timeout = probe, wait_timeout
        self._event_loop = self._stop = None

    async def call_check(self, remote_peer: PeerID, *, check_peer: PeerID) -> Optional[bool]:
        request = dht_pb2.PingRequest(peer=dht_pb2.NodeInfo(node_id=check_peer.to_bytes()))
        response = await self.get_stub(self.probe, remote_peer).rpc_check(request, timeout=self.wait_timeout)
        return response.available

    async def rpc_check(self, request: dht_pb2.PingRequest, context: P2PContext) -> dht_pb2.PingResponse:
        response = dht_pb2.PingResponse(available=True)
        check_peer = PeerID(request.peer.node_id)
        if check_peer != context.local_id:  # check someone else: dial it from the probe
            response.available = await self.call_check(check_peer, check_peer=check_peer) is True
        return response

    @asynccontextmanager
    async def serve(self, p2p: P2P):
        try:
            await self.add_p2p_handlers(p2p)
            yield self
        finally:
            await self.remove_p2p_handlers(p2p)

    @classmethod
    def attach_to_dht(cls, dht: DHT) -> "ReachabilityProtocol":
        protocol, ready = cls(), Future()

        async def _serve_with_probe():
            try:
                common_p2p = await dht.replicate_p2p()
                protocol._event_loop, protocol._stop = asyncio.get_event_loop(), asyncio.Event()
                initial_peers = [str(addr) for addr in await common_p2p.get_visible_maddrs(latest=True)]
                for info in await common_p2p.list_peers():
                    initial_peers.extend(f"{addr}/p2p/{info.peer_id}" for addr in info.addrs)
                protocol.probe = await P2P.create(initial_peers, **PROBE_ARGS)
                ready.set_result(True)
                async with protocol.serve(common_p2p):
                    await protocol._stop.wait()
            except Exception as e:
                if not ready.done():
                    ready.set_exception(e)
            finally:
                if protocol.probe is not None:
                    await protocol.probe.shutdown()

        threading.Thread(target=partial(asyncio.run, _serve_with_probe()), daemon=True).start()
        ready.result(timeout=30)
        return protocol

    def shutdown(self):
        self._event_loop.call_soon_threadsafe(self._stop.set)


def check_direct_reachability(**kwargs) -> Optional[bool]:
    """petals.server.reachability.check_direct_reachability: asks the peers in a fresh client node's routing table
    whether they can reach it"""

    async def _check_direct_reachability():
        target_dht = await DHTNode.create(client_mode=True, **kwargs)
        try:
            protocol = ReachabilityProtocol(probe=target_dht.protocol.p2p)
            async with protocol.serve(target_dht.protocol.p2p):
                remote_peers = list(target_dht.protocol.routing_table.peer_id_to_uid.keys())
                answers = [
                    await protocol.call_check(remote_peer=peer, check_peer=target_dht.peer_id) for peer in remote_peers
                ]
            return len(remote_peers), answers
        finally:
            await target_dht.shutdown()

    return RemoteExpertWorker.run_coroutine(_check_direct_reachability())


@pytest.mark.timeout(90)
def test_petals_reachability_check_through_a_client_node_and_probe_daemons():
    first = DHT(start=True)
    second = DHT(initial_peers=first.get_visible_maddrs(), start=True)
    protocols = []
    try:
        protocols = [ReachabilityProtocol.attach_to_dht(dht) for dht in (first, second)]
        num_peers, answers = check_direct_reachability(initial_peers=first.get_visible_maddrs())
        assert num_peers == 2 and answers == [True, True]
    finally:
        for protocol in protocols:
            protocol.shutdown()
        second.shutdown()
        first.shutdown()


def test_the_routing_table_maps_peer_ids_and_node_ids_both_ways():
    async def run():
        first = await DHTNode.create()
        second = await DHTNode.create(initial_peers=[str(a) for a in await first.protocol.p2p.get_visible_maddrs()])
        try:
            table = second.protocol.routing_table
            assert table.peer_id_to_uid == {first.peer_id: first.node_id}
            assert table.uid_to_peer_id == {first.node_id: first.peer_id}
            index = table.get_bucket_index(first.node_id)
            assert first.node_id in table.buckets[index]
        finally:
            await second.shutdown()
            await first.shutdown()

    asyncio.run(run())


def test_a_comma_separated_initial_peers_string_is_refused_with_the_list_to_pass():
    # lightning-hivemind passes HivemindStrategy(initial_peers="maddr1,maddr2") to the DHT as it is (the original's
    # daemon then fails to start): the error shows the list to pass instead
    first, second = "/ip4/127.0.0.1/tcp/1/p2p/A", "/ip4/127.0.0.1/tcp/2/p2p/B"
    with pytest.raises(
        TypeError, match=r"e\.g\. \['/ip4/127\.0\.0\.1/tcp/1/p2p/A', '/ip4/127\.0\.0\.1/tcp/2/p2p/B'\]"
    ):
        DHT(initial_peers=f"{first},{second}", start=False)
    with pytest.raises(TypeError, match=r"e\.g\. \['/ip4/127\.0\.0\.1/tcp/1/p2p/A'\], not a single string"):
        DHT(initial_peers=first, start=False)
