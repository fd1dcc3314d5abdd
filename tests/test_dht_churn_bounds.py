"""A long-lived DHT node (e.g. a bootstrap peer) keeps bounded state while short-lived peers join, store, get and
leave (shut down, or their daemon killed): its descriptors, its daemon's descriptors, its tasks, and its storage once
the values they stored expired."""

import asyncio
import os
import signal

import pytest

from hivemind.dht.node import DHTNode
from hivemind.utils.timed_storage import get_dht_time

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts open files through /proc"),
]

NUM_VISITORS = 12
SLACK_FDS = 3  # a connection still closing, a lazily opened helper


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def visit(bootstrap_maddrs, index: int) -> None:
    visitor = await DHTNode.create(initial_peers=bootstrap_maddrs, cache_refresh_before_expiry=0)
    try:
        assert await visitor.store(f"visitor_{index}", index, get_dht_time() + 1)
        assert await visitor.store("visitors", index, get_dht_time() + 1, subkey=index)
        assert (await visitor.get(f"visitor_{index}", latest=True)).value == index
    finally:
        if index % 2:
            os.kill(visitor.p2p._daemon.pid, signal.SIGKILL)  # gone without a word
        await visitor.shutdown()


async def test_bootstrap_node_state_stays_bounded_under_churn():
    node = await DHTNode.create(cache_refresh_before_expiry=0)
    try:
        maddrs = [str(maddr) for maddr in await node.get_visible_maddrs()]
        daemon_pid = node.p2p._daemon.pid
        await visit(maddrs, 0)  # the first visit may open what stays (listeners, a pipe file)
        await asyncio.sleep(0.5)
        fds_before, daemon_fds_before = open_fds(os.getpid()), open_fds(daemon_pid)
        tasks_before = len(asyncio.all_tasks())

        for index in range(1, NUM_VISITORS):
            await visit(maddrs, index)

        await asyncio.sleep(1.5)  # every value the visitors stored has expired by now
        assert await node.get("visitor_1") is None  # a search that also meets the dead visitors
        assert len(node.protocol.storage) == 0 and len(node.protocol.storage.data) == 0  # purged, not just hidden
        assert len(node.protocol.storage.expiration_heap) <= 64
        assert not node._pending_gets and not node._unconfirmed_stores
        routing_table = node.protocol.routing_table
        active = sum(len(bucket.nodes) for bucket in routing_table.buckets)
        assert len(routing_table._node_by_peer) == len(routing_table._peer_by_node) == active
        assert len(node.blacklist._banned) <= NUM_VISITORS
        assert len(asyncio.all_tasks()) <= tasks_before + 1
        assert open_fds(os.getpid()) <= fds_before + SLACK_FDS
        assert open_fds(daemon_pid) <= daemon_fds_before + SLACK_FDS
    finally:
        await node.shutdown()
