"""A group that lists a member which does not run it (it stopped waiting for its leader just as the leader started
the group: the message was on its way) ends within the timeouts: the others average among themselves, that member's
parts keep their local values, and the warning says that it does not run the group (real p2pd peers)."""

import asyncio
import os
import time
from typing import AsyncIterator

import pytest
import torch
from allreduce_helpers import (
    AllreduceRouter,
    assert_two_averaged_without_the_third,
    collect,
    hivemind_logs,
    make_connected_peers,
    make_runner,
    start_routers,
)

from hivemind.p2p import P2PContext, ServicerBase
from hivemind.proto import averaging_pb2
from hivemind.utils.asyncio import anext

__all__ = ["hivemind_logs"]  # the fixture, used by the test below

pytestmark = pytest.mark.timeout(60)

SIZE, PART_BYTES = 96, 64  # 16 float32 elements per part: each of the three members reduces two parts


class AbsentMember(ServicerBase):
    """A member that searched again instead of running the group: it knows no such group id (served under the
    handler name of the others' router, like an averager)."""

    async def rpc_aggregate_part(
        self, parts: AsyncIterator[averaging_pb2.AveragingData], context: P2PContext
    ) -> AsyncIterator[averaging_pb2.AveragingData]:
        await anext(parts)
        yield averaging_pb2.AveragingData(code=averaging_pb2.MessageCode.BAD_GROUP_ID)


AbsentMember.__name__ = AllreduceRouter.__name__


async def test_a_listed_member_that_does_not_run_the_group_keeps_its_parts_local_and_is_named(
    p2p_factory, hivemind_logs
):
    peers = await make_connected_peers(p2p_factory, 3)
    routers = await start_routers(peers[:2])
    await AbsentMember().add_p2p_handlers(peers[2], namespace="test_allreduce")
    values = [torch.randn(SIZE) for _ in range(3)]
    group_id = os.urandom(20)
    kwargs = dict(part_size_bytes=PART_BYTES, sender_timeout=0.5, reducer_timeout=1.0)
    runners = [make_runner(peers[i], routers[i], peers, group_id, [values[i]], **kwargs) for i in (0, 1)]
    started = time.monotonic()
    deltas = await asyncio.wait_for(asyncio.gather(*(collect(runner) for runner in runners)), 20)
    assert time.monotonic() - started < 5  # sender_timeout for its parts, at once for the parts it reduces
    assert_two_averaged_without_the_third(values, deltas, runners[0].container)
    warnings = [record.getMessage() for record in hivemind_logs.records if record.levelname == "WARNING"]
    absent = str(peers[2].peer_id)
    assert any(absent in message and "does not run this group" in message for message in warnings), warnings
