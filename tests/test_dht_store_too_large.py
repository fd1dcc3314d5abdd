"""A store whose request is too large for one message fails on the storing side: the replica did nothing wrong."""

import asyncio
import logging

import pytest
from dht_swarm import launch_swarm, shutdown_all

from hivemind.utils.timed_storage import get_dht_time


@pytest.mark.timeout(60)
async def test_a_value_too_large_for_a_message_keeps_the_replica_in_the_routing_table():
    nodes = await launch_swarm(2)
    try:
        assert nodes[1].node_id in nodes[0].protocol.routing_table
        # 5 MB: no request can carry it (4 MiB per message), so it never leaves this peer
        assert await nodes[0].store("too_large", b"x" * (5 << 20), get_dht_time() + 60, exclude_self=True) is False
        assert nodes[1].node_id in nodes[0].protocol.routing_table  # it was never asked: not a failed peer
        # the next store finds it among the known nodes and it takes the value
        assert await nodes[0].store("small_after_large", 1, get_dht_time() + 60, exclude_self=True) is True
    finally:
        await shutdown_all(nodes)


@pytest.mark.timeout(60)
async def test_a_value_too_large_for_a_message_is_warned_about_once_per_store(caplog):
    nodes = await launch_swarm(4)
    try:
        with caplog.at_level(logging.WARNING):
            assert await nodes[0].store("too_large", b"x" * (5 << 20), get_dht_time() + 60, exclude_self=True) is False
            await asyncio.sleep(2.0)  # replicas are confirmed 1 s after the store: no warning then either
        warnings = [record.getMessage() for record in caplog.records if "not sent" in record.getMessage()]
        assert len(warnings) == 1, [message[:120] for message in warnings]  # one per candidate replica (3) before
        assert "not sent to any remote peer" in warnings[0] and "store large data elsewhere" in warnings[0]
    finally:
        await shutdown_all(nodes)
