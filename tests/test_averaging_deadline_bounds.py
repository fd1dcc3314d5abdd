"""How far rounds can push the derived deadlines (no timeouts given). A member that makes every round finish late,
just before the last calls cut it (a hostile peer dripping its parts), lowered the measured bandwidth each round, and
the next derived deadline grew ~1.27x per round without end: 100 MB in 4 peers, 70 s -> 2 734 s in 11 rounds, and
rounds cut at their last calls stretched that by up to 4x more. The bandwidth estimate now stays above a quarter of
the best it has had, and the derived allreduce_timeout (stretch included) within 4x of what that best gives, while an
honest network that slows down is followed up to that factor."""

import logging
from types import SimpleNamespace

import pytest

from hivemind.averaging.averager_rounds import AveragingRounds
from hivemind.averaging.deadlines import MAX_SLOWDOWN, AdaptiveDeadlines
from hivemind.averaging.partition import DEFAULT_PART_SIZE_BYTES

VECTOR, GROUP = 100 * 10**6, 4  # 150 MB in and out of each member per round: 15 s at the initial 10 MB/s guess
LATE = 0.84  # rounds end at 84% of their deadline: not cut at the 85% last call


def _round(deadlines: AdaptiveDeadlines):
    return deadlines.for_round(VECTOR, GROUP, DEFAULT_PART_SIZE_BYTES)


def _late_rounds(deadlines: AdaptiveDeadlines, count: int) -> list:
    timeouts = []
    for _ in range(count):
        this_round = _round(deadlines)
        deadlines.record_round(VECTOR, GROUP, LATE * this_round.allreduce_timeout, this_round)
        timeouts.append(_round(deadlines).allreduce_timeout)
    return timeouts


def test_a_member_finishing_every_round_late_pushes_the_deadline_at_most_four_times_past_the_best_rounds():
    deadlines = AdaptiveDeadlines()
    assert _round(deadlines).allreduce_timeout == pytest.approx(70.0, rel=0.01)
    deadlines.record_round(VECTOR, GROUP, 15.0, _round(deadlines))  # an honest round at 10 MB/s
    best = _round(deadlines)
    timeouts = _late_rounds(deadlines, 30)
    assert max(timeouts) <= MAX_SLOWDOWN * best.allreduce_timeout * 1.0001, timeouts
    assert deadlines.bandwidth == pytest.approx(deadlines.best_bandwidth / MAX_SLOWDOWN)
    assert _round(deadlines).limited
    slowest = _round(deadlines)
    assert slowest.sender_timeout <= MAX_SLOWDOWN * best.sender_timeout * 1.0001
    assert slowest.reducer_timeout <= MAX_SLOWDOWN * best.reducer_timeout * 1.0001


def test_a_member_late_from_the_first_round_is_bounded_by_that_round():
    deadlines = AdaptiveDeadlines()
    timeouts = _late_rounds(deadlines, 30)  # before: 70 s -> 2 734 s in 11 rounds, and on
    assert max(timeouts) <= MAX_SLOWDOWN * timeouts[0] * 1.0001, timeouts


def test_late_rounds_and_cut_rounds_together_stay_within_the_same_bound():
    deadlines = AdaptiveDeadlines()
    deadlines.record_round(VECTOR, GROUP, 15.0, _round(deadlines))
    best = _round(deadlines).allreduce_timeout
    timeouts = []
    for _ in range(10):
        _late_rounds(deadlines, 2)
        deadlines.record_cut_round(_round(deadlines), needed_seconds=1e9)  # then cut, dripping one part a day
        timeouts.append(_round(deadlines).allreduce_timeout)
    assert max(timeouts) <= MAX_SLOWDOWN * best * 1.0001, timeouts


def test_the_floor_is_reported_when_it_applies():
    deadlines = AdaptiveDeadlines()
    assert not deadlines.record_round(VECTOR, GROUP, 15.0, _round(deadlines))
    for _ in range(10):
        assert not deadlines.record_round(VECTOR, GROUP, 45.0, _round(deadlines))  # 3x slower: followed
    assert not _round(deadlines).limited
    floored = [deadlines.record_round(VECTOR, GROUP, 1500.0, _round(deadlines)) for _ in range(5)]  # 100x slower
    assert all(floored)
    assert deadlines.bandwidth == pytest.approx(deadlines.best_bandwidth / MAX_SLOWDOWN)
    assert _round(deadlines).limited


def test_an_honest_network_that_slows_down_is_followed_up_to_the_documented_factor():
    deadlines = AdaptiveDeadlines()
    deadlines.record_round(VECTOR, GROUP, 15.0, _round(deadlines))
    # its links get congested: rounds take 10% longer each time, up to 12 times the first round's 15 s
    seconds = 15.0
    while seconds < 12 * 15.0:
        seconds *= 1.1
        this_round = _round(deadlines)
        assert seconds < 0.85 * this_round.allreduce_timeout, (seconds, this_round)  # completes before the cuts
        deadlines.record_round(VECTOR, GROUP, seconds, this_round)


def test_a_network_slower_than_the_bound_gets_deadlines_at_the_limit():
    deadlines = AdaptiveDeadlines()
    deadlines.record_round(VECTOR, GROUP, 15.0, _round(deadlines))
    best = _round(deadlines)
    for _ in range(20):
        deadlines.record_round(VECTOR, GROUP, 20 * 15.0, _round(deadlines))
    slow = _round(deadlines)
    assert slow.limited and best.allreduce_timeout < slow.allreduce_timeout <= MAX_SLOWDOWN * best.allreduce_timeout
    deadlines.record_cut_round(slow, needed_seconds=1e9)  # cut too: the stretch takes it up to the bound, no further
    assert _round(deadlines).allreduce_timeout == pytest.approx(MAX_SLOWDOWN * best.allreduce_timeout)


def test_a_round_cut_at_the_limit_says_to_pass_allreduce_timeout(caplog):
    deadlines = AdaptiveDeadlines()
    deadlines.record_round(VECTOR, GROUP, 15.0, _round(deadlines))
    for _ in range(20):
        deadlines.record_round(VECTOR, GROUP, 20 * 15.0, _round(deadlines))
    averager = SimpleNamespace(_deadlines=deadlines)  # what the averager's rounds use of it here
    with caplog.at_level(logging.INFO, logger="hivemind.averaging.averager_rounds"):
        AveragingRounds._learn_from_cut_round(averager, _round(deadlines), needed_seconds=1000.0)
    [record] = caplog.records
    assert record.levelno == logging.WARNING and "pass allreduce_timeout" in record.getMessage(), record.getMessage()


def test_explicit_timeouts_are_not_limited():
    deadlines = AdaptiveDeadlines(allreduce_timeout=5000.0, sender_timeout=100.0)
    deadlines.record_round(VECTOR, GROUP, 15.0, _round(deadlines))
    for _ in range(10):
        deadlines.record_round(VECTOR, GROUP, 3000.0, _round(deadlines))
    this_round = _round(deadlines)
    assert (this_round.allreduce_timeout, this_round.sender_timeout, this_round.limited) == (5000.0, 100.0, False)
