"""Requests under fresh node ids: choosing the keys that each newcomer should hold never stalls the node."""

import asyncio
import random
import time

import pytest

from hivemind.dht.node import DHTNode
from hivemind.dht.protocol import DHTProtocol
from hivemind.dht.routing import DHTID
from hivemind.p2p import P2P
from hivemind.proto import dht_pb2
from hivemind.utils.timed_storage import get_dht_time

pytestmark = pytest.mark.usefixtures("frozen_heap")  # CPU-time bounds: see conftest.frozen_heap

NUM_STORED_KEYS = 100_000  # choosing a newcomer's keys among them costs about a second of CPU


def fill_storage(node: DHTNode) -> None:
    expiration = get_dht_time() + 600
    for _ in range(NUM_STORED_KEYS):
        node.protocol.storage.store(DHTID(random.getrandbits(160)), b"\x01", expiration)


async def wait_for_background_work(protocol: DHTProtocol) -> None:
    while protocol._background_tasks:
        await asyncio.gather(*list(protocol._background_tasks), return_exceptions=True)


@pytest.mark.timeout(60)
async def test_requests_under_fresh_ids_do_not_stall_the_event_loop():
    node = await DHTNode.create(wait_timeout=1)
    attacker = await P2P.create(initial_peers=await node.get_visible_maddrs())
    fill_storage(node)
    longest_gap, ticking = 0.0, True

    async def ticker():
        """The most CPU time this thread spent between two turns of the ticker (time preempted by the OS excluded)."""
        nonlocal longest_gap
        last = time.thread_time()
        while ticking:
            await asyncio.sleep(0.005)
            now = time.thread_time()
            longest_gap, last = max(longest_gap, now - last), now

    stub = DHTProtocol.get_stub(attacker, node.peer_id)
    ticker_task = asyncio.create_task(ticker())
    try:
        for _ in range(10):
            fresh_id = DHTID.generate()
            await stub.rpc_ping(dht_pb2.PingRequest(peer=dht_pb2.NodeInfo(node_id=fresh_id.to_bytes())), timeout=5)
        await wait_for_background_work(node.protocol)
        ticking = False
        await ticker_task
        assert longest_gap < 0.5  # choosing all keys in one piece takes about a second (0.37 s seen at load 10)
    finally:
        ticking = False
        await attacker.shutdown()
        await node.shutdown()


@pytest.mark.timeout(60)
async def test_fresh_id_flood_cannot_make_a_live_holder_lose_its_id():
    target = await DHTNode.create(wait_timeout=2)
    victim = await DHTNode.create(initial_peers=await target.get_visible_maddrs(), wait_timeout=2)
    attacker = await P2P.create(initial_peers=await target.get_visible_maddrs())
    fill_storage(target)
    stub = DHTProtocol.get_stub(attacker, target.peer_id)

    async def introduce(node_id: DHTID) -> None:
        await stub.rpc_ping(dht_pb2.PingRequest(peer=dht_pb2.NodeInfo(node_id=node_id.to_bytes())), timeout=30)

    try:
        assert target.protocol.routing_table.get(node_id=victim.node_id) == victim.peer_id
        # claim the victim's id, then keep the target busy choosing keys for newcomers while it pings the victim
        await asyncio.gather(introduce(victim.node_id), *(introduce(DHTID.generate()) for _ in range(6)))
        await wait_for_background_work(target.protocol)
        assert target.protocol.routing_table.get(node_id=victim.node_id) == victim.peer_id
    finally:
        await attacker.shutdown()
        await victim.shutdown()
        await target.shutdown()


@pytest.mark.timeout(30)
async def test_newcomer_receives_the_keys_it_should_hold():
    holder = await DHTNode.create()
    expiration = get_dht_time() + 60
    key_ids = [DHTID.generate(f"key {i}") for i in range(600)]  # more than one slice of keys
    for key_id in key_ids:
        holder.protocol.storage.store(key_id, b"\x01", expiration)
    newcomer = await DHTNode.create(initial_peers=await holder.get_visible_maddrs())
    try:
        await wait_for_background_work(holder.protocol)
        # the holder knew no other node: the newcomer is one of the nearest nodes of every key
        assert all(newcomer.protocol.storage.get(key_id) == (b"\x01", expiration) for key_id in key_ids)
    finally:
        await newcomer.shutdown()
        await holder.shutdown()
