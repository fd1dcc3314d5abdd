"""A group member that sends each part (or each reply) just within sender_timeout (reducer_timeout) is never taken
for a stalled one, but a round of many parts would then outlast allreduce_timeout: without a last call, one such
member made every reducer it sends to, and every sender it reduces for, fail its whole step. Shortly before the
round's time runs out, a reducer excludes the senders that have not delivered all their parts, and a sender gives up
on the reducers that have not replied to all; their remaining parts keep their local values (real DHTs and p2pd
daemons on 127.0.0.1)."""

import asyncio
import time

import pytest
import torch
from allreduce_helpers import sender_messages
from averaging_hostile_peer import PREFIX, delta_message, hostile_setup, run_step

from hivemind.averaging.partition import TensorPartContainer
from hivemind.averaging.payload import encode_gather

pytestmark = pytest.mark.timeout(90)

OPTIONS = dict(part_size_bytes=64, sender_timeout=1.0, reducer_timeout=2.0, allreduce_timeout=8.0)


async def test_a_sender_that_drips_its_parts_is_excluded_before_the_round_runs_out_of_time():
    values = torch.arange(512, dtype=torch.float32)  # 32 parts of 16 elements, 16 reduced by each member
    async with hostile_setup([values.clone()], **OPTIONS) as (hostile, victim):
        hostile.gather = encode_gather(None, 0, None)  # a full member: it also sends parts to the victim
        hostile.make_delta = lambda message: delta_message(torch.zeros(16))  # (its own reduction: no change)
        started = time.monotonic()
        step = asyncio.create_task(run_step(hostile, victim, timeout=40, allow_retries=False))
        await asyncio.wait_for(hostile.joined.wait(), 15)
        container = TensorPartContainer([torch.zeros(512)], [1.0, 1.0], part_size_bytes=64)
        messages = sender_messages(container, 1, hostile.group_id)

        async def drip():
            for message in messages:  # 16 parts, one every 0.7 s: never a stall, but 11 s in all
                yield message
                await asyncio.sleep(0.7)

        stub = type(hostile).get_stub(hostile.p2p, victim.peer_id, namespace=PREFIX)
        sending = asyncio.create_task(_replies(stub, drip()))
        try:
            outcome = await step
        finally:
            sending.cancel()
        assert isinstance(outcome, dict), outcome
        assert time.monotonic() - started < 15
        with victim.get_tensors() as (averaged,):
            second_half = averaged[256:]  # the victim's own range: averaged with the zeros that were delivered
            halved = torch.isclose(second_half, values[256:] / 2)
            kept = torch.isclose(second_half, values[256:])
            assert bool((halved | kept).all()) and 0 < int(halved.sum()) < 256
            assert torch.equal(averaged[:256], values[:256])  # the hostile's range: its deltas were zeros


async def test_a_reducer_that_drips_its_replies_is_given_up_before_the_round_runs_out_of_time():
    values = torch.arange(512, dtype=torch.float32)
    async with hostile_setup([values.clone()], **OPTIONS) as (hostile, victim):
        hostile.make_delta = lambda message: delta_message(torch.full((16,), 1.0))
        hostile.reply_delay = 1.5  # within reducer_timeout each time, but 24 s for its 16 parts
        started = time.monotonic()
        outcome = await run_step(hostile, victim, timeout=40, allow_retries=False)
        assert isinstance(outcome, dict), outcome
        assert time.monotonic() - started < 15
        with victim.get_tensors() as (averaged,):
            moved = averaged[:256] != values[:256]
            assert torch.equal(averaged[:256][moved], values[:256][moved] + 1)  # the replies that came in time
            assert 0 < int(moved.sum()) < 256
            assert torch.equal(averaged[256:], values[256:])


async def _replies(stub, parts):
    return [reply async for reply in await stub.rpc_aggregate_part(parts)]
