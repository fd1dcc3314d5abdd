"""A reducer's handler waits for a sender's first part as long as its measured rounds say a part may take: it used
to drop every stream whose first part took longer than the 5 s floor, so a sender on a slow but honest link (whose
rounds the averager had measured, and whose deadlines it had stretched) was still excluded from every round."""

import asyncio
import types

import pytest
import torch

from hivemind.averaging.averager_rounds import AveragingRounds
from hivemind.averaging.deadlines import AdaptiveDeadlines
from hivemind.proto import averaging_pb2

pytestmark = pytest.mark.timeout(20)

GROUP_ID = b"g" * 20


class _Host(AveragingRounds):
    """The parts of an averager that its part handler reads (no process, no network)."""

    def __init__(self, deadlines: AdaptiveDeadlines):
        self._deadlines, self.request_timeout, self.part_size_bytes = deadlines, 0.5, 2**19
        self._averaged_tensors = (torch.zeros(2**18),)  # 1 MiB
        self._init_round_state()


class _Runner:
    async def rpc_aggregate_part(self, stream, context):
        async for _ in stream:
            yield averaging_pb2.AveragingData(code=averaging_pb2.AVERAGED_PART)


async def _slow_sender(delay: float):
    await asyncio.sleep(delay)  # the first part crawls over a slow link
    yield averaging_pb2.AveragingData(code=averaging_pb2.PART_FOR_AVERAGING, group_id=GROUP_ID)


async def test_a_first_part_slower_than_the_floor_is_awaited_when_measured_rounds_were_slow():
    deadlines = AdaptiveDeadlines(min_sender_timeout=0.2)
    deadlines.record_round(2**20, 2, seconds=4.0)  # this averager's rounds run at ~260 KB/s
    host = _Host(deadlines)
    host._running_groups[GROUP_ID] = _Runner()
    context = types.SimpleNamespace(remote_id="slow sender")
    replies = [reply async for reply in host.rpc_aggregate_part(_slow_sender(0.6), context)]
    assert [reply.code for reply in replies] == [averaging_pb2.AVERAGED_PART]


async def test_a_silent_stream_is_still_dropped_at_the_floor_on_fast_links():
    host = _Host(AdaptiveDeadlines(min_sender_timeout=0.2))  # no rounds measured: 10 MB/s assumed
    host._running_groups[GROUP_ID] = _Runner()
    context = types.SimpleNamespace(remote_id="silent sender")
    replies = await asyncio.wait_for(_collect(host.rpc_aggregate_part(_slow_sender(30.0), context)), 5)
    assert replies == []


async def _collect(stream):
    return [item async for item in stream]
