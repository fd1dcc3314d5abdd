"""Calls that downstream projects (petals 2.2.0, lightning-hivemind 0.1.0) make into hivemind, run the way their code
runs them, against real daemons: DHT.run_coroutine with coroutines that read the DHT and drive its DHTNode, and the
peer-to-peer helpers petals' reachability check and ping use."""

import math
from functools import partial

import pytest

from hivemind.dht import DHT, DHTNode
from hivemind.proto import dht_pb2
from hivemind.utils import MPFuture, get_dht_time


async def _declare_active_modules(dht: DHT, node: DHTNode, uids, value, expiration_time):
    """petals.utils.dht._declare_active_modules: runs in the DHT process and reads dht.peer_id / dht.num_workers."""
    num_workers = len(uids) if dht.num_workers is None else min(len(uids), dht.num_workers)
    return await node.store_many(
        keys=uids,
        subkeys=[dht.peer_id.to_base58()] * len(uids),
        values=[value] * len(uids),
        expiration_time=expiration_time,
        num_workers=num_workers,
    )


async def _get_remote_module_infos(dht: DHT, node: DHTNode, uids, expiration_time):
    num_workers = len(uids) if dht.num_workers is None else min(len(uids), dht.num_workers)
    found = await node.get_many(uids, expiration_time, num_workers=num_workers)
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
