"""A sender that is slow but steady (a throttled link) and behind at the round's last call: a reducer keeps it when
its pace so far delivers its remaining parts before the round's deadline, and still excludes one whose pace cannot
(real p2pd peers on 127.0.0.1)."""

from typing import Optional

import pytest
from allreduce_helpers import HONEST_REDUCER_VALUES, PACED_SENDER_VALUES, hivemind_logs, round_with_paced_senders

from hivemind.averaging.deadlines import SenderPace

__all__ = ["hivemind_logs"]  # the fixture, used by the tests below

pytestmark = pytest.mark.timeout(60)

SIZE, PART_BYTES = 512, 64  # 32 parts of 16 float32 elements, 16 reduced by each of the two honest members
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
    """Two honest members reduce; the third streams each of them its 16 parts, part k (from 1) at
    ``k * seconds_per_part`` seconds after the round started; with ``silent_after``, it sends only that many and then
    keeps its streams open in silence. Returns the honest members' results, the averages with and without the slow
    member's parts, and how long the round took."""
    results, elapsed = await round_with_paced_senders(
        p2p_factory,
        [lambda k: (k + 1) * seconds_per_part if silent_after is None or k < silent_after else None],
        size=SIZE, part_bytes=PART_BYTES, wait=40, **(timeouts or TIMEOUTS),
    )  # fmt: skip
    slow_value, honest = PACED_SENDER_VALUES[0], HONEST_REDUCER_VALUES
    return results, (slow_value + sum(honest)) / 3, sum(honest) / 2, elapsed


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


async def test_a_sender_that_starts_late_is_judged_by_its_pace_from_its_own_first_part(p2p_factory, hivemind_logs):
    # a member whose all-reduce starts at 30% of the reducers' deadline (it learned of the group late, or its machine
    # is slow): its first part arrives then and its 16th at 87%, after the last call (85%). Its pace counts from its
    # own first part: it is spared and averaged in full. The reducers cannot wait for parts past their own deadline,
    # whenever their sender started: a late one whose parts arrive after 90% of it is cut as any sender is
    timeouts = dict(sender_timeout=5.0, reducer_timeout=10.0, allreduce_timeout=12.0)  # its first part within 5 s
    late, last = 0.3 * timeouts["allreduce_timeout"], 0.87 * timeouts["allreduce_timeout"]
    results, elapsed = await round_with_paced_senders(
        p2p_factory, [lambda k: late + k * (last - late) / 15],
        size=SIZE, part_bytes=PART_BYTES, wait=40, **timeouts,
    )  # fmt: skip
    with_late = (PACED_SENDER_VALUES[0] + sum(HONEST_REDUCER_VALUES)) / 3
    for result in results:
        assert bool((result == with_late).all()), result  # every part averaged with the late member
    assert elapsed < timeouts["allreduce_timeout"]
    assert not [r.getMessage() for r in hivemind_logs.records if "excluded sender" in r.getMessage()]
