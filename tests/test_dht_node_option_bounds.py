"""DHTNode.create refuses a num_workers or wait_timeout with which the node could never complete a request."""

import math

import pytest

from hivemind.dht.node import DHTNode


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
