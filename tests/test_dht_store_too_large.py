"""
A store whose request is too large for one message fails on the storing side: the replica did nothing wrong. A
request that fits but carries a key of over 1 MiB is sent alone; a peer that does not answer it is silent as any.
"""

import asyncio
import logging
import os
import random
import signal

import pytest
from dht_swarm import launch_swarm, shutdown_all

import hivemind
from hivemind.dht.node import DHTNode
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


@pytest.mark.timeout(120)
async def test_a_peer_silent_to_a_large_key_gets_no_more_keys_of_that_store():
    frozen = hivemind.DHT(start=True)  # its DHT process is stopped below: its daemon takes requests, nobody answers
    nodes = [await DHTNode.create(initial_peers=frozen.get_visible_maddrs()) for _ in range(3)]
    storer, sent_to_frozen, frozen_id = nodes[-1], [], frozen.peer_id  # (asked of its process before it stops)
    send = storer.protocol.call_store_if_it_fits

    async def counting_send(peer_id, *args):
        if peer_id == frozen_id:
            sent_to_frozen.append(peer_id)
        return await send(peer_id, *args)

    storer.protocol.call_store_if_it_fits = counting_send
    os.kill(frozen.pid, signal.SIGSTOP)
    try:
        keys = [f"large_{index}" for index in range(8)]
        values = [random.randbytes(1_200_000) for _ in keys]  # each over 1 MiB: a request of its own
        stored = await storer.store_many(keys, values, get_dht_time() + 300, exclude_self=True)
        assert stored == dict.fromkeys(keys, True)  # the two live peers took them
        # the two requests in flight when it fell silent; before, all 8 (each waiting for wait_timeout, 12 s in all)
        assert len(sent_to_frozen) <= 2, f"{len(sent_to_frozen)} large keys sent to the silent peer"
    finally:
        os.kill(frozen.pid, signal.SIGCONT)
        await shutdown_all(nodes)
        frozen.shutdown()
