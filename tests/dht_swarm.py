"""Shared set-up for DHT tests: swarms of DHTNodes on 127.0.0.1, each with its own p2pd daemon."""

import asyncio
from typing import List

from hivemind.dht.node import DHTNode


async def launch_swarm(num_nodes: int, **kwargs) -> List[DHTNode]:
    """Start one node, then the others bootstrapping from it concurrently; returns them in start order."""
    first = await DHTNode.create(**kwargs)
    initial_peers = await first.get_visible_maddrs()
    others = await asyncio.gather(
        *(DHTNode.create(initial_peers=initial_peers, **kwargs) for _ in range(num_nodes - 1))
    )
    return [first, *others]


async def shutdown_all(nodes: List[DHTNode]) -> None:
    await asyncio.gather(*(node.shutdown() for node in nodes), return_exceptions=True)
