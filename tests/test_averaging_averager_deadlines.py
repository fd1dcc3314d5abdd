"""Adaptive all-reduce deadlines: derived from bandwidth, vector size and group size; explicit values win."""

import math

import pytest

from hivemind.averaging.deadlines import AdaptiveDeadlines, RoundDeadlines

MiB = 2**20


def test_loopback_sized_round_gets_the_floors():
    deadlines = AdaptiveDeadlines().for_round(vector_bytes=4 * MiB, group_size=4, part_bytes=MiB // 2)
    assert deadlines.sender_timeout == 5.0
    assert deadlines.reducer_timeout == 10.0
    assert deadlines.allreduce_timeout == 30.0


def test_slow_measured_link_stretches_every_deadline():
    deadlines = AdaptiveDeadlines()
    fast = deadlines.for_round(vector_bytes=256 * MiB, group_size=4, part_bytes=MiB // 2)
    deadlines.record_round(vector_bytes=256 * MiB, group_size=4, seconds=400.0)  # ~1 MB/s
    slow = deadlines.for_round(vector_bytes=256 * MiB, group_size=4, part_bytes=MiB // 2)
    assert slow.sender_timeout > fast.sender_timeout
    assert slow.reducer_timeout == 2 * slow.sender_timeout
    assert slow.allreduce_timeout > 4 * 400.0  # the safety factor times the measured duration


def test_bigger_groups_wait_longer_for_a_part():
    deadlines = AdaptiveDeadlines(initial_bandwidth=1e5, min_sender_timeout=0.1)
    # 8 MiB: each of 8 members owns 1 MiB, so parts of 1/2 MiB exist (a part is never more than a member's share)
    small = deadlines.for_round(vector_bytes=8 * MiB, group_size=2, part_bytes=MiB // 2)
    large = deadlines.for_round(vector_bytes=8 * MiB, group_size=8, part_bytes=MiB // 2)
    assert large.sender_timeout == pytest.approx(7 * small.sender_timeout)


def test_bandwidth_is_a_moving_average():
    deadlines = AdaptiveDeadlines(ema_alpha=0.5)
    deadlines.record_round(vector_bytes=MiB, group_size=2, seconds=1.0)  # moves 1 MiB
    assert deadlines.bandwidth == pytest.approx(MiB)
    deadlines.record_round(vector_bytes=MiB, group_size=2, seconds=0.5)
    assert deadlines.bandwidth == pytest.approx(1.5 * MiB)


def test_a_lonely_or_instant_round_does_not_change_the_estimate():
    deadlines = AdaptiveDeadlines(initial_bandwidth=123.0)
    deadlines.record_round(vector_bytes=MiB, group_size=1, seconds=1.0)
    deadlines.record_round(vector_bytes=MiB, group_size=4, seconds=0.0)
    assert deadlines.bandwidth == 123.0 and deadlines.measured_rounds == 0


def test_explicit_values_win():
    deadlines = AdaptiveDeadlines(sender_timeout=1.0, reducer_timeout=3.0, allreduce_timeout=7.0)
    deadlines.record_round(vector_bytes=MiB, group_size=2, seconds=1000.0)
    assert deadlines.for_round(MiB, 8, MiB // 2) == RoundDeadlines(1.0, 3.0, 7.0)


def test_explicit_sender_timeout_implies_twice_as_long_for_reducers():
    assert AdaptiveDeadlines(sender_timeout=2.0).for_round(MiB, 2, MiB).reducer_timeout == 4.0


def test_explicit_reducer_timeout_caps_the_derived_sender_timeout():
    result = AdaptiveDeadlines(reducer_timeout=4.0).for_round(MiB, 2, MiB)
    assert result.sender_timeout == 2.0 and result.reducer_timeout == 4.0


@pytest.mark.parametrize("sender, reducer", [(2.0, 2.0), (3.0, 1.0)])
def test_reducer_timeout_must_exceed_sender_timeout(sender, reducer):
    with pytest.raises(ValueError, match="must exceed sender_timeout"):
        AdaptiveDeadlines(sender_timeout=sender, reducer_timeout=reducer)


@pytest.mark.parametrize(
    "name, value",
    [
        (name, value)
        for name in ("sender_timeout", "reducer_timeout", "allreduce_timeout")
        for value in (0.0, -1.0, float("inf"), float("nan"))
        if (name, value) != ("allreduce_timeout", float("inf"))  # no limit on the round: see below
    ],
)
def test_non_positive_timeouts_are_refused(name, value):
    with pytest.raises(ValueError, match=name):
        AdaptiveDeadlines(**{name: value})


def test_a_group_padded_by_its_leader_does_not_stretch_the_deadlines_beyond_sixteen_members():
    # a hostile leader announcing 1024 members (1022 of them never connect) made a victim wait 214 s per sender
    deadlines = AdaptiveDeadlines()
    sixteen = deadlines.for_round(vector_bytes=64 * MiB, group_size=16, part_bytes=MiB // 2)
    padded = deadlines.for_round(vector_bytes=64 * MiB, group_size=1024, part_bytes=MiB // 2)
    assert padded.sender_timeout == sixteen.sender_timeout < 10
    assert padded.reducer_timeout == sixteen.reducer_timeout


def test_an_infinite_allreduce_timeout_means_no_limit_on_the_round():
    # e.g. hivemind.Optimizer(averaging_timeout=math.inf), which hivemind 1.1.12 runs with
    deadlines = AdaptiveDeadlines(allreduce_timeout=math.inf).for_round(4 * MiB, group_size=4, part_bytes=MiB // 2)
    assert deadlines.allreduce_timeout is None
    assert deadlines.sender_timeout == 5.0 and deadlines.reducer_timeout == 10.0  # still derived
