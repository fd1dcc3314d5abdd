"""DHTNode.create refuses a num_workers or wait_timeout with which the node could never complete a request."""

import math

import numpy as np
import pytest

from hivemind.dht.node import DHTNode
from hivemind.utils.timed_storage import get_dht_time


@pytest.mark.timeout(30)
@pytest.mark.parametrize("num_workers", [0, -1])
async def test_num_workers_below_one_is_refused_at_creation(num_workers):
    with pytest.raises(ValueError, match="num_workers"):
        node = await DHTNode.create(num_workers=num_workers)
        await node.shutdown()  # before: created, and every later get or store raised from its search


@pytest.mark.timeout(30)
@pytest.mark.parametrize("wait_timeout", [0, -1.0, math.nan])
async def test_wait_timeout_not_above_zero_is_refused_at_creation(wait_timeout):
    with pytest.raises(ValueError, match="wait_timeout"):
        node = await DHTNode.create(wait_timeout=wait_timeout)
        await node.shutdown()  # before: created, and every request timed out at once


@pytest.mark.timeout(30)
async def test_positive_options_are_accepted():
    node = await DHTNode.create(num_workers=1, wait_timeout=0.5)
    try:
        assert node.num_workers == 1 and node.protocol.wait_timeout == 0.5
    finally:
        await node.shutdown()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("num_replicas", [0, -1])
async def test_num_replicas_below_one_is_refused_at_creation(num_replicas):
    with pytest.raises(ValueError, match=r"num_replicas must be a positive integer.*got"):
        node = await DHTNode.create(num_replicas=num_replicas)
        await node.shutdown()  # before: created, and every store returned False (no replica to store to)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("parallel_rpc", [0, -2, math.inf, math.nan, "2"])
async def test_parallel_rpc_not_above_zero_is_refused_at_creation(parallel_rpc):
    with pytest.raises(ValueError, match=r"parallel_rpc must be None \(no limit\) or a positive number"):
        node = await DHTNode.create(parallel_rpc=parallel_rpc)
        await node.shutdown()  # before (0): with initial peers, the node waited forever for its first ping


@pytest.mark.timeout(60)
@pytest.mark.parametrize("parallel_rpc, limit", [(2.0, 2), (1.5, 2), (0.5, 1)])
async def test_a_parallel_rpc_given_as_a_float_is_accepted_and_rounded_up(parallel_rpc, limit):
    """hivemind 1.1.12 runs with parallel_rpc=2.0 (e.g. from a config file) and with fractions (0.5 too: one request
    at a time)"""
    first = await DHTNode.create(parallel_rpc=parallel_rpc)
    second = await DHTNode.create(parallel_rpc=parallel_rpc, initial_peers=await first.get_visible_maddrs())
    try:
        assert second.protocol.rpc_semaphore._value == limit
        assert await second.store("key", "value", get_dht_time() + 30)
        assert (await first.get("key")).value == "value"
    finally:
        await second.shutdown()
        await first.shutdown()


@pytest.mark.timeout(30)
async def test_a_limit_of_one_rpc_and_one_replica_is_accepted():
    node = await DHTNode.create(parallel_rpc=1, num_replicas=1)
    await node.shutdown()


@pytest.mark.timeout(60)
async def test_numpy_integers_are_accepted_as_counts():
    """hivemind 1.1.12 accepts numpy integers (e.g. from a config parsed with numpy) for these counts."""
    node = await DHTNode.create(num_workers=np.int32(2), num_replicas=np.int64(3), parallel_rpc=np.int64(4))
    try:
        assert (node.num_workers, node.num_replicas) == (2, 3)
        assert type(node.num_workers) is int and type(node.num_replicas) is int
        assert await node.store("key", "value", get_dht_time() + 30)
        assert (await node.get("key")).value == "value"
    finally:
        await node.shutdown()
