"""Shared set-up for DHT tests: swarms of DHTNodes on 127.0.0.1, each with its own p2pd daemon."""

import asyncio
from typing import List

from hivemind.dht.node import DHTNode


async def launch_swarm(num_nodes: int, **kwargs) -> List[DHTNode]:
    """
    Start one node, then the others one by one bootstrapping from it; returns them in start order. Sequential start
    makes every routing table complete (each newcomer's self-lookup visits all earlier nodes), so tests can reason
    about which nodes are the nearest to a key.
    """
    nodes = [await DHTNode.create(**kwargs)]
    initial_peers = await nodes[0].get_visible_maddrs()
    for _ in range(num_nodes - 1):
        nodes.append(await DHTNode.create(initial_peers=initial_peers, **kwargs))
    return nodes


async def shutdown_all(nodes: List[DHTNode]) -> None:
    await asyncio.gather(*(node.shutdown() for node in nodes), return_exceptions=True)
