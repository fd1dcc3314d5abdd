"""Searches end when a peer's find answers name ever nearer made-up node ids: one node id per peer in a search."""

import asyncio
import itertools
from typing import List

import pytest
from dht_swarm import launch_swarm, shutdown_all

from hivemind.dht.node import DHTNode
from hivemind.dht.routing import DHTID
from hivemind.utils.timed_storage import get_dht_time


def name_endless_ids_of_its_own(hostile: DHTNode) -> List[int]:
    """Make ``hostile`` answer every find with node ids nearer to the key than any before, all at its own peer."""
    calls, counter = [0], itertools.count(1)

    def forged_neighbors(query_id, k, exclude=None):
        calls[0] += 1
        base = (1 << 150) - next(counter) * k
        return [(DHTID(int(query_id) ^ (base - i)), hostile.peer_id) for i in range(k)]

    hostile.protocol.routing_table.get_nearest_neighbors = forged_neighbors
    return calls


@pytest.mark.timeout(60)
async def test_bootstrap_from_a_peer_naming_endless_ids_of_its_own_ends():
    hostile = await DHTNode.create()
    calls = name_endless_ids_of_its_own(hostile)
    try:
        victim = await asyncio.wait_for(DHTNode.create(initial_peers=await hostile.get_visible_maddrs()), 15)
        await victim.shutdown()
        assert calls[0] == 1  # the self-lookup asks the hostile peer once, under the one id it is known by
    finally:
        await hostile.shutdown()


@pytest.mark.timeout(60)
async def test_get_and_store_through_a_peer_naming_endless_ids_of_its_own_end():
    nodes = await launch_swarm(3, bucket_size=2, num_replicas=2)  # a full routing table: stores search first
    victim, honest, hostile = nodes
    calls = name_endless_ids_of_its_own(hostile)
    try:
        assert await asyncio.wait_for(honest.store("key", "value", get_dht_time() + 30), 15)
        result = await asyncio.wait_for(victim.get("key", latest=True), 15)
        assert result is not None and result.value == "value"
        found = await asyncio.wait_for(victim.find_nearest_nodes([DHTID.generate("other")], exclude_self=True), 15)
        assert set(found[DHTID.generate("other")].values()) <= {honest.peer_id, hostile.peer_id}
        assert calls[0] <= 3  # once per search (store, get, find_nearest_nodes), not once per made-up id
    finally:
        await shutdown_all(nodes)
