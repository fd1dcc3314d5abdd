"""A sender that is slow but steady (a throttled link) and behind at the round's last call: a reducer keeps it when
its pace so far delivers its remaining parts before the round's deadline, and still excludes one whose pace cannot
(real p2pd peers on 127.0.0.1)."""

import asyncio
import os
from typing import Optional

import pytest
import torch
from allreduce_helpers import (
    call_reducer,
    collect,
    hivemind_logs,
    make_connected_peers,
    make_runner,
    sender_messages,
    start_routers,
)

from hivemind.averaging.deadlines import SenderPace
from hivemind.averaging.partition import TensorPartContainer

__all__ = ["hivemind_logs"]  # the fixture, used by the tests below

pytestmark = pytest.mark.timeout(60)

SIZE, PART_BYTES = 512, 64  # 32 parts of 16 float32 elements, 16 reduced by each of the two honest members
FRACTIONS = [0.0, 1.0, 1.0]  # the slow member only sends
ALLREDUCE_TIMEOUT = 16.0
TIMEOUTS = dict(sender_timeout=3.0, reducer_timeout=6.0, allreduce_timeout=ALLREDUCE_TIMEOUT)  # parts come well within


def test_a_steady_pace_is_projected_from_the_first_and_latest_deliveries():
    pace = SenderPace()
    for k in range(1, 6):
        pace.delivered(0, now=float(k))  # one part per second, 5 of 8 by t=5: the last one due at t=8
    assert pace.finishes_by(0, delivered=5, total=8, deadline=8.0, now=5.5)
    assert not pace.finishes_by(0, delivered=5, total=8, deadline=7.9, now=5.5)
    # stalled since its latest part: the rest is projected from now, not from that part
    assert not pace.finishes_by(0, delivered=5, total=8, deadline=8.0, now=6.5)


def test_a_burst_then_a_drip_is_judged_by_the_drip():
    pace = SenderPace()
    for now in (1.0, 1.0, 1.0, 1.0, 5.0):  # 4 parts at once, then one after 4 s: the mean says 1 s per part
        pace.delivered(0, now=now)
    assert not pace.finishes_by(0, delivered=5, total=8, deadline=10.0, now=5.5)  # at 4 s per part: t=17
    assert pace.finishes_by(0, delivered=5, total=8, deadline=17.0, now=5.5)


def test_one_part_a_little_late_keeps_the_mean_pace():
    pace = SenderPace()
    for now in (1.0, 2.0, 3.0, 4.0, 5.6):  # the 5th part 0.6 s late
        pace.delivered(0, now=now)
    assert pace.finishes_by(0, delivered=5, total=8, deadline=9.1, now=5.7)  # at the mean 1.15 s: t=9.05


def test_a_sender_silent_for_longer_than_its_pace_has_stalled():
    pace = SenderPace()
    for now in (1.0, 1.25, 1.5, 1.75):  # a quick pace, then nothing: as if frozen after its 4th part
        pace.delivered(0, now=now)
    assert not pace.finishes_by(0, delivered=4, total=5, deadline=12.0, now=10.0)  # its one part left is not due now
    assert not pace.finishes_by(0, delivered=4, total=8, deadline=12.0, now=10.0)
    assert pace.finishes_by(0, delivered=4, total=5, deadline=12.0, now=2.1)  # within its pace: due at once


def test_a_sender_without_a_pace_yet_is_not_projected_to_finish():
    pace = SenderPace()
    assert not pace.finishes_by(0, delivered=0, total=8, deadline=100.0, now=1.0)
    pace.delivered(0, now=1.0)
    assert not pace.finishes_by(0, delivered=1, total=8, deadline=100.0, now=1.0)
    assert pace.finishes_by(1, delivered=8, total=8, deadline=0.0, now=1.0)  # (nothing left to deliver)


async def _round_with_a_paced_sender(
    p2p_factory, seconds_per_part: float, silent_after: Optional[int] = None, timeouts: Optional[dict] = None
):
    """Two honest members reduce; the third streams each of them its 16 parts, part k at ``k * seconds_per_part``
    seconds after the round started (on a fixed schedule, so that a busy machine does not slow it further); with
    ``silent_after``, it sends only that many and then keeps its streams open in silence. Returns the honest members'
    results, the averages with and without the slow member's parts, and how long the round took."""
    peers = await make_connected_peers(p2p_factory, 3)
    routers = await start_routers(peers)
    slow_value, honest_values = 30.0, (0.0, 6.0)
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
            **(timeouts or TIMEOUTS),
        )  # fmt: skip
        for i in (1, 2)
    ]
    container = TensorPartContainer([torch.full((SIZE,), slow_value)], FRACTIONS, part_size_bytes=PART_BYTES)
    loop = asyncio.get_running_loop()
    started = loop.time()

    async def paced(reducer_index):
        for k, message in enumerate(sender_messages(container, reducer_index, group_id), start=1):
            if silent_after is not None and k > silent_after:
                await asyncio.Event().wait()  # (cancelled at the end of the round)
            await asyncio.sleep(max(0.0, started + k * seconds_per_part - loop.time()))
            yield message

    sending = [asyncio.create_task(call_reducer(peers[0], peers[i], paced(i))) for i in (1, 2)]
    try:
        deltas = await asyncio.wait_for(asyncio.gather(*(collect(runner) for runner in runners)), 40)
        elapsed = loop.time() - started
    finally:
        for task in sending:
            task.cancel()
        await asyncio.gather(*sending, return_exceptions=True)
    results = [own + delta for own, (delta,) in zip(honest_values, deltas)]
    return results, (slow_value + sum(honest_values)) / 3, sum(honest_values) / 2, elapsed


async def test_a_steady_sender_that_finishes_before_the_deadline_is_not_cut_at_the_last_call(
    p2p_factory, hivemind_logs
):
    # the 16th part arrives at 86% of allreduce_timeout: behind at the last call (85%), done well before the end
    results, with_slow, _, elapsed = await _round_with_a_paced_sender(p2p_factory, 0.86 * ALLREDUCE_TIMEOUT / 16)
    for result in results:
        assert bool((result == with_slow).all()), result  # every part averaged with the slow member
    assert elapsed < ALLREDUCE_TIMEOUT
    assert not [r.getMessage() for r in hivemind_logs.records if "excluded sender" in r.getMessage()]


async def test_a_steady_sender_too_slow_for_the_deadline_is_still_cut_at_the_last_call(p2p_factory, hivemind_logs):
    # at this pace the 16th part would arrive at 130% of allreduce_timeout
    results, with_slow, without, elapsed = await _round_with_a_paced_sender(p2p_factory, 1.3 * ALLREDUCE_TIMEOUT / 16)
    for result in results:
        assert bool(((result == with_slow) | (result == without)).all()), result
        assert 0 < int((result == without).sum()) < SIZE  # the slow member was excluded from its later parts only
    assert elapsed < 0.95 * ALLREDUCE_TIMEOUT
    banned = [r.getMessage() for r in hivemind_logs.records if "last call" in r.getMessage()]
    assert banned, [r.getMessage() for r in hivemind_logs.records]


async def test_a_sender_gone_silent_after_a_quick_pace_is_cut_at_the_first_last_call(p2p_factory, hivemind_logs):
    # 15 of its 16 parts by 23% of the round, then silence with its streams open (frozen, or hostile), within a
    # sender_timeout long enough not to catch it first: its pace says nothing about when the last part comes
    timeouts = dict(sender_timeout=12.0, reducer_timeout=13.0, allreduce_timeout=ALLREDUCE_TIMEOUT)
    results, with_slow, without, _ = await _round_with_a_paced_sender(
        p2p_factory, 0.25, silent_after=15, timeouts=timeouts
    )
    for result in results:
        assert bool(((result == with_slow) | (result == without)).all()), result
        assert int((result == without).sum()) == 2 * SIZE // 32  # its last part at each of the two reducers
    banned = [r.getMessage() for r in hivemind_logs.records if "last call" in r.getMessage()]
    assert banned and all("(85% of allreduce_timeout" in message for message in banned), banned
