"""AllReduceRunner counts the bytes it puts on and takes off the wire in a round (for its log lines)."""

import asyncio
import logging
import os

import pytest
import torch
from allreduce_helpers import collect, make_connected_peers, make_runner, start_routers

from hivemind.compression import Float16Compression, NoCompression

pytestmark = pytest.mark.timeout(60)

SIZE, PART_BYTES = 1000, 1000  # float32: 4000 bytes, two parts of 250 elements for each of the two reducers
MESSAGES_PER_DIRECTION = 4  # each peer sends (at most) 2 parts and 2 replies, and receives as many
MAX_OVERHEAD = 128  # bytes of one message besides its tensor's buffer (code, group id, shape, dtype...)


@pytest.mark.parametrize("compression, element_bytes", [(NoCompression(), 4), (Float16Compression(), 2)])
async def test_a_round_counts_the_bytes_it_sent_and_received(p2p_factory, caplog, compression, element_bytes):
    peers = await make_connected_peers(p2p_factory, 2)
    routers = await start_routers(peers)
    group_id = os.urandom(20)
    options = dict(compression=compression, part_size_bytes=PART_BYTES)
    runners = [make_runner(peers[i], routers[i], peers, group_id, [torch.randn(SIZE)], **options) for i in (0, 1)]
    logger = logging.getLogger("hivemind")
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.DEBUG, logger="hivemind"):
            await asyncio.wait_for(asyncio.gather(*(collect(runner) for runner in runners)), 30)
    finally:
        logger.removeHandler(caplog.handler)
    payload = SIZE // 2 * element_bytes * 2  # half the vector goes out as parts and comes back as deltas
    for runner in runners:
        for counted in (runner.bytes_sent, runner.bytes_received):
            assert payload <= counted <= payload + MESSAGES_PER_DIRECTION * MAX_OVERHEAD, (counted, payload)
    lines = [record.getMessage() for record in caplog.records]
    for runner in runners:
        expected = f"{runner.bytes_sent} bytes sent and {runner.bytes_received} bytes received"
        assert any(runner.group_id.hex()[:8] in line and expected in line for line in lines), lines
