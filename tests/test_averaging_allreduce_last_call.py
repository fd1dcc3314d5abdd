"""The round's last call (a reducer excludes the senders that have not delivered all parts shortly before
allreduce_timeout) must exclude the sender that holds the round up, not the honest senders that wait behind it: a
reducer takes parts only a few ahead of the oldest unfinished one, so while one member drips its parts, every other
sender is held back too and has not delivered all its parts either (real p2pd peers on 127.0.0.1)."""

import asyncio
import os

import pytest
import torch
from allreduce_helpers import (
    HONEST_REDUCER_VALUES,
    PACED_SENDER_VALUES,
    call_reducer,
    collect,
    hivemind_logs,
    make_connected_peers,
    make_runner,
    round_with_paced_senders,
    sender_messages,
    start_routers,
)

from hivemind.averaging.partition import TensorPartContainer

__all__ = ["hivemind_logs"]  # the fixture, used by the tests below

pytestmark = pytest.mark.timeout(60)

SIZE, PART_BYTES = 512, 64  # 32 parts of 16 float32 elements, 16 reduced by each of the two honest members
FRACTIONS = [0.0, 1.0, 1.0]  # the dripping member only sends
TIMEOUTS = dict(sender_timeout=1.0, reducer_timeout=2.0, allreduce_timeout=8.0)


async def test_the_last_call_excludes_the_dripping_sender_and_not_the_honest_ones_held_behind_it(
    p2p_factory, hivemind_logs
):
    peers = await make_connected_peers(p2p_factory, 3)
    routers = await start_routers(peers)
    dripper_value, honest_values = 30.0, (0.0, 6.0)
    group_id = os.urandom(20)
    runners = [
        make_runner(
            peers[i],
            routers[i],
            peers,
            group_id,
            [torch.full((SIZE,), honest_values[i - 1])],
            peer_fractions=FRACTIONS,
            part_size_bytes=PART_BYTES,
            **TIMEOUTS,
        )  # fmt: skip
        for i in (1, 2)
    ]
    container = TensorPartContainer([torch.full((SIZE,), dripper_value)], FRACTIONS, part_size_bytes=PART_BYTES)

    async def drip(reducer_index):
        for message in sender_messages(container, reducer_index, group_id):  # 16 parts, 11 s in all
            yield message
            await asyncio.sleep(0.7)  # within sender_timeout each time

    dripping = [asyncio.create_task(call_reducer(peers[0], peers[i], drip(i))) for i in (1, 2)]
    try:
        deltas = await asyncio.wait_for(asyncio.gather(*(collect(runner) for runner in runners)), 15)
    finally:
        for task in dripping:
            task.cancel()
        await asyncio.gather(*dripping, return_exceptions=True)

    with_dripper, without = (dripper_value + sum(honest_values)) / 3, sum(honest_values) / 2
    for own, (delta,) in zip(honest_values, deltas):
        result = own + delta
        assert bool(((result == with_dripper) | (result == without)).all()), result  # never left at its own value
        assert 0 < int((result == without).sum()) < SIZE  # the dripper was excluded from the later parts only
    banned = [r.getMessage() for r in hivemind_logs.records if "last call" in r.getMessage()]
    assert banned and all(peers[0].peer_id.to_base58()[-8:] in message for message in banned), banned


async def test_a_dripper_held_behind_another_dripper_is_cut_at_the_final_call(p2p_factory, hivemind_logs):
    # two drippers: the slower holds the round up and is cut at the last call (85%); the other, held a few parts
    # ahead of it by the reducer's window until then, holds it up next and must not drip the round past its deadline
    schedules = [lambda k: 0.9 * k, lambda k: 0.6 * k]  # each part within sender_timeout; the second ends at 9 s
    results, _ = await round_with_paced_senders(
        p2p_factory, schedules, size=SIZE, part_bytes=PART_BYTES, wait=TIMEOUTS["allreduce_timeout"], **TIMEOUTS
    )  # as the averager does: the round's deltas must be in within allreduce_timeout, or the step fails
    (first, second, _), honest_values = PACED_SENDER_VALUES, HONEST_REDUCER_VALUES
    everyone, without_first = (first + second + sum(honest_values)) / 4, (second + sum(honest_values)) / 3
    without_both = sum(honest_values) / 2
    for result in results:
        assert bool(((result == everyone) | (result == without_first) | (result == without_both)).all()), result
        assert int((result == without_both).sum()) > 0  # the second dripper was cut too, from its later parts
    banned = [r.getMessage() for r in hivemind_logs.records if "last call" in r.getMessage()]
    assert any("(90% of allreduce_timeout" in message for message in banned), banned


async def test_a_chain_of_drippers_does_not_hold_the_round_past_its_deadline(p2p_factory, hivemind_logs):
    # three drippers, each held a few parts ahead of the one before it: the first is cut at 85%, the second at 90%,
    # and the third, still ahead then, would deliver its last part at 16.7 s of a 16 s round: at 92.5% a reducer takes
    # no more parts from anyone, so that its replies to the parts it has are out before the senders give up on
    # unanswered reducers at 95% (at the same mark, each honest member lost its last part at the other)
    timeouts = dict(sender_timeout=2.0, reducer_timeout=4.0, allreduce_timeout=16.0)
    schedules = [lambda k: 1.8 * k, lambda k: 1.2 * k, lambda k: 1.0 * k if k < 14 else 13.0 + 1.85 * (k - 13)]
    results, _ = await round_with_paced_senders(
        p2p_factory, schedules, size=SIZE, part_bytes=PART_BYTES, wait=timeouts["allreduce_timeout"], **timeouts
    )
    for result in results:
        assert int((result == sum(HONEST_REDUCER_VALUES) / 2).sum()) > 0  # every dripper cut from its later parts
    banned = [r.getMessage() for r in hivemind_logs.records if "last call" in r.getMessage()]
    assert any("(92.5% of allreduce_timeout" in message for message in banned), banned
    failed = [r.getMessage() for r in hivemind_logs.records if "failed after" in r.getMessage()]
    assert not failed, failed  # the honest members got each other's replies to every part
