"""Parts for a group whose all-reduce already ended on the receiving averager are refused with BAD_GROUP_ID at once.

A member stalled past its round (e.g. a process frozen for a few seconds) sends its parts once it resumes, after the
others finished the round without it. They used to wait GROUP_SETUP_TIMEOUT for that group to be registered (as for
a group that a member may still be setting up), so the stalled peer lost 5 s more before it learned that its round
was over. A group never seen here still gets that wait (real DHTs and p2pd daemons on 127.0.0.1)."""

import os
import time

import pytest
import torch
from allreduce_helpers import sender_messages
from averaging_hostile_peer import PREFIX, delta_message, hostile_setup, run_step

from hivemind.averaging.averager_rounds import GROUP_SETUP_TIMEOUT
from hivemind.averaging.partition import TensorPartContainer
from hivemind.proto import averaging_pb2
from hivemind.utils.asyncio import as_aiter

pytestmark = pytest.mark.timeout(60)


async def _send_parts(hostile, victim, group_id: bytes):
    """The victim's reply codes to one reducer's worth of parts for ``group_id``, and how long they took."""
    container = TensorPartContainer([torch.zeros(64)], [1.0, 1.0], part_size_bytes=64)
    stub = type(hostile).get_stub(hostile.p2p, victim.peer_id, namespace=PREFIX)
    started = time.monotonic()
    stream = await stub.rpc_aggregate_part(as_aiter(*sender_messages(container, 1, group_id)))
    codes = [reply.code async for reply in stream]
    return codes, time.monotonic() - started


async def test_parts_for_a_group_that_ended_here_are_refused_at_once_and_unknown_groups_still_wait():
    tensor = torch.arange(64, dtype=torch.float32)
    async with hostile_setup([tensor], part_size_bytes=64) as (hostile, victim):
        hostile.make_delta = lambda message: delta_message(torch.zeros(16))  # an honest aux reducer of equal values
        outcome = await run_step(hostile, victim, timeout=20)
        assert isinstance(outcome, dict), outcome  # the round with hostile.group_id ended on the victim

        codes, elapsed = await _send_parts(hostile, victim, hostile.group_id)
        assert codes == [averaging_pb2.BAD_GROUP_ID]
        assert elapsed < GROUP_SETUP_TIMEOUT / 2, f"waited {elapsed:.2f} s for a group that had ended"

        codes, elapsed = await _send_parts(hostile, victim, os.urandom(20))
        assert codes == [averaging_pb2.BAD_GROUP_ID]
        assert elapsed > GROUP_SETUP_TIMEOUT - 1.0, f"a group never seen here was refused after {elapsed:.2f} s"
