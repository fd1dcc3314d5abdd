"""How far rounds can push the derived deadlines (no timeouts given). A member that makes every round finish late,
just before the last calls cut it (a hostile peer dripping its parts), lowered the measured bandwidth each round, and
the next derived deadline grew ~1.27x per round without end: 100 MB in 4 peers, 70 s -> 2 734 s in 11 rounds, and
rounds cut at their last calls stretched that by up to 4x more. The bandwidth estimate now stays above a quarter of
the best it has had, and the derived allreduce_timeout (stretch included) within 4x of what that best gives, while an
honest network that slows down is followed up to that factor."""

import logging
import math
from types import SimpleNamespace

import pytest
import torch
from averager_helpers import FAST, dht_swarm, run_allreduce, wait_for_stage

from hivemind.averaging.averager import DecentralizedAverager
from hivemind.averaging.averager_rounds import AveragingRounds
from hivemind.averaging.control import AveragingStage
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
    deadlines.record_round(VECTOR, GROUP, 15.0, _round(deadlines))
    for _ in range(10):
        deadlines.record_round(VECTOR, GROUP, 45.0, _round(deadlines))  # 3x slower: followed
        assert not _round(deadlines).limited
    for _ in range(5):
        deadlines.record_round(VECTOR, GROUP, 1500.0, _round(deadlines))  # 100x slower
        assert _round(deadlines).limited
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


def test_a_small_vector_whose_deadline_is_the_floor_is_not_limited():
    # latency makes the measured bandwidth of a small vector swing tenfold on a busy machine; at the floor of the
    # estimate its deadline is still the 30 s minimum, which a lower estimate would not raise: nothing is held back
    deadlines = AdaptiveDeadlines()
    small = 4096
    deadlines.record_round(small, 2, 0.02, deadlines.for_round(small, 2, DEFAULT_PART_SIZE_BYTES))
    for _ in range(8):
        deadlines.record_round(small, 2, 0.5, deadlines.for_round(small, 2, DEFAULT_PART_SIZE_BYTES))
    assert deadlines.at_floor
    this_round = deadlines.for_round(small, 2, DEFAULT_PART_SIZE_BYTES)
    assert this_round.allreduce_timeout == deadlines.min_allreduce_timeout and not this_round.limited


@pytest.mark.timeout(60)
@pytest.mark.parametrize("allreduce_timeout", [math.inf, 600.0])
def test_rounds_with_a_given_allreduce_timeout_at_the_floor_succeed_without_advice(allreduce_timeout, tmp_path):
    """The floor also holds the estimate behind derived sender timeouts when allreduce_timeout is given; the round
    then formatted allreduce_timeout=None into its log line (TypeError) or told the user to pass what they had."""
    # the averagers log from their own processes, forked with this handler
    log_file = logging.FileHandler(tmp_path / "rounds.log")
    rounds_logger = logging.getLogger("hivemind.averaging.averager_rounds")
    rounds_logger.addHandler(log_file)
    with dht_swarm(2) as dhts:
        averagers = []
        try:
            for index, dht in enumerate(dhts):
                averager = DecentralizedAverager(
                    [torch.full((1024,), float(index))], dht, prefix="floorgiven", start=False, target_group_size=2,
                    min_group_size=2, allreduce_timeout=allreduce_timeout, **FAST,
                )  # fmt: skip
                deadlines = averager._deadlines
                deadlines.record_round(4096, 2, 1e-6)  # a best round far faster than loopback: at the floor now
                deadlines.bandwidth = deadlines.best_bandwidth / MAX_SLOWDOWN
                averager.run_in_background(await_ready=True, timeout=30)
                averagers.append(averager)
            controls = [averager.step(wait=False, require_trigger=True) for averager in averagers]
            wait_for_stage(controls, AveragingStage.AWAITING_TRIGGER)
            run_allreduce(controls, timeout=15)  # before: TypeError in every attempt, retried until it timed out
            for averager in averagers:
                with averager.get_tensors() as tensors:
                    assert torch.allclose(tensors[0], torch.full((1024,), 0.5))
            logs = (tmp_path / "rounds.log").read_text()
            assert "Averaged 4096 bytes" in logs and "pass allreduce_timeout" not in logs, logs
        finally:
            for averager in averagers:
                averager.shutdown()
            rounds_logger.removeHandler(log_file)
            log_file.close()
