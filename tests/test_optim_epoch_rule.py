"""The swarm-progress rules of hivemind.Optimizer, tested as plain functions (no DHT, no clock)."""

import math
from dataclasses import dataclass

import pytest

from hivemind.optim.epoch_rule import (
    GlobalTrainingProgress,
    RefreshPolicy,
    count_expected_peers,
    is_synchronized,
    is_time_for_global_step,
    next_epoch,
    should_load_state,
    should_schedule_averaging,
    summarize_swarm,
)

NOW = 1_000_000.0


@dataclass
class Record:
    peer_id: bytes
    epoch: int
    samples_accumulated: int
    samples_per_second: float = 0.0
    time: float = NOW
    client_mode: bool = False


def swarm(epoch=3, samples=0, target=100, eta=math.inf):
    return GlobalTrainingProgress(epoch, samples, target, 2, 0, eta_next_epoch=eta, next_fetch_time=NOW)


def test_no_records_means_epoch_zero_and_no_eta():
    progress = summarize_swarm([], target_batch_size=64, now=NOW)
    assert (progress.epoch, progress.samples_accumulated, progress.num_peers) == (0, 0, 0)
    assert progress.eta_next_epoch == math.inf


def test_global_epoch_is_the_highest_and_only_its_peers_count_samples():
    records = [Record(b"a", 3, 10), Record(b"b", 4, 7), Record(b"c", 4, 5), Record(b"d", 2, 100)]
    progress = summarize_swarm(records, target_batch_size=64, now=NOW)
    assert progress.epoch == 4
    assert progress.samples_accumulated == 12
    assert progress.num_peers == 4


def test_client_mode_peers_are_counted():
    records = [Record(b"a", 1, 1, client_mode=True), Record(b"b", 1, 1)]
    assert summarize_swarm(records, target_batch_size=64, now=NOW).num_clients == 1


def test_local_record_replaces_the_stale_copy_from_the_dht():
    stale, fresh = Record(b"me", 1, 5), Record(b"me", 1, 30)
    progress = summarize_swarm([stale, Record(b"x", 1, 10)], target_batch_size=64, now=NOW, local_record=fresh)
    assert progress.samples_accumulated == 40
    assert progress.num_peers == 2


def test_eta_divides_the_samples_left_by_the_swarm_speed():
    records = [Record(b"a", 0, 20, samples_per_second=10.0), Record(b"b", 0, 20, samples_per_second=30.0)]
    progress = summarize_swarm(records, target_batch_size=100, now=NOW)
    assert progress.eta_next_epoch == pytest.approx(NOW + 60 / 40)


def test_eta_accounts_for_progress_made_since_an_old_report():
    records = [Record(b"a", 0, 0, samples_per_second=10.0, time=NOW - 5)]
    progress = summarize_swarm(records, target_batch_size=100, now=NOW)
    assert progress.eta_next_epoch == pytest.approx(NOW + 5)


def test_extrapolation_is_capped_and_future_reports_do_not_count_backwards():
    old = summarize_swarm(
        [Record(b"a", 0, 0, samples_per_second=1.0, time=NOW - 1000)], target_batch_size=100, now=NOW
    )
    assert old.eta_next_epoch == pytest.approx(NOW + 40)  # at most 60 s of extrapolation
    future = summarize_swarm(
        [Record(b"a", 0, 0, samples_per_second=1.0, time=NOW + 50)], target_batch_size=100, now=NOW
    )
    assert future.eta_next_epoch == pytest.approx(NOW + 100)


def test_reached_target_gives_eta_now():
    progress = summarize_swarm([Record(b"a", 0, 100, samples_per_second=1.0)], target_batch_size=100, now=NOW)
    assert progress.eta_next_epoch == NOW


@pytest.mark.parametrize("speed", [math.inf, math.nan, 0.0])
def test_non_finite_or_zero_speed_does_not_break_the_estimate(speed):
    progress = summarize_swarm([Record(b"a", 0, 10, samples_per_second=speed)], target_batch_size=100, now=NOW)
    assert progress.eta_next_epoch == math.inf
    assert math.isfinite(progress.next_fetch_time)


def test_refresh_delay_shrinks_near_the_end_of_the_epoch_within_bounds():
    policy = RefreshPolicy(min_refresh_period=0.5, max_refresh_period=10, expected_drift_rate=0.2)
    assert policy.delay(time_to_eta=1000, num_peers=2) == 10
    assert policy.delay(time_to_eta=10, num_peers=2) == pytest.approx(2.0)
    assert policy.delay(time_to_eta=0.1, num_peers=2) == 0.5


def test_refresh_delay_when_alone_is_the_default_period():
    assert RefreshPolicy(default_refresh_period=3).delay(time_to_eta=0.1, num_peers=1) == 3


def test_refresh_policy_refuses_min_above_max():
    with pytest.raises(ValueError, match="refresh periods"):
        RefreshPolicy(min_refresh_period=5, max_refresh_period=1)


def test_global_step_when_target_reached():
    assert is_time_for_global_step(3, swarm(samples=100), now=NOW)
    assert not is_time_for_global_step(3, swarm(samples=99), now=NOW)


def test_global_step_when_eta_passed():
    assert is_time_for_global_step(3, swarm(eta=NOW - 0.1), now=NOW)
    assert not is_time_for_global_step(3, swarm(eta=NOW + 0.1), now=NOW)


def test_global_step_when_another_peer_is_ahead():
    assert is_time_for_global_step(3, swarm(epoch=4), now=NOW)


@pytest.mark.parametrize("local, global_, expected", [(3, 3, 4), (3, 7, 7), (3, 4, 4), (5, 2, 6)])
def test_next_epoch_is_max_of_local_plus_one_and_global(local, global_, expected):
    assert next_epoch(local, global_) == expected


def test_strict_check_loads_state_when_one_epoch_behind():
    assert should_load_state(3, 4, strict=True)
    assert not should_load_state(4, 4, strict=True)


def test_lenient_check_tolerates_one_epoch_of_lag():
    assert not should_load_state(3, 4, strict=False)
    assert should_load_state(3, 5, strict=False)


def test_synchronized_means_at_most_one_epoch_behind():
    assert is_synchronized(3, 4) and is_synchronized(5, 4)
    assert not is_synchronized(3, 5)


def test_averaging_is_scheduled_once_when_the_epoch_end_is_near():
    assert should_schedule_averaging(NOW + 4, NOW, matchmaking_time=5, already_scheduled=False)
    assert not should_schedule_averaging(NOW + 4, NOW, matchmaking_time=5, already_scheduled=True)
    assert not should_schedule_averaging(NOW + 6, NOW, matchmaking_time=5, already_scheduled=False)
    assert not should_schedule_averaging(math.inf, NOW, matchmaking_time=5, already_scheduled=False)


def test_expected_peers_are_those_in_this_epoch_and_last_rounds_partners_just_behind():
    records = [
        Record(b"me", epoch=5, samples_accumulated=8),
        Record(b"ahead", epoch=6, samples_accumulated=0),
        Record(b"same", epoch=5, samples_accumulated=16),
        Record(b"partner", epoch=4, samples_accumulated=64),  # finishing last round's step: it is coming
        Record(b"dead", epoch=4, samples_accumulated=24),  # stopped in the last epoch, was not in its round
        Record(b"old", epoch=2, samples_accumulated=8),  # two epochs behind: gone or downloading the state
    ]
    last_round = {b"me", b"same", b"partner"}
    assert count_expected_peers(records, local_epoch=5, last_round_peers=last_round) == 4
    # no round known yet (a new start): every peer one epoch behind may still come
    assert count_expected_peers(records, local_epoch=5, last_round_peers=None) == 5
    # after a failed round, only peers that report this epoch are expected
    assert count_expected_peers(records, local_epoch=5, last_round_peers=set()) == 3


def test_expected_peers_count_each_peer_once():
    records = [Record(b"me", epoch=1, samples_accumulated=0), Record(b"me", epoch=1, samples_accumulated=4)]
    assert count_expected_peers(records, local_epoch=1, last_round_peers=None) == 1


def test_a_peer_that_reported_the_previous_epoch_after_this_one_left_it_is_expected():
    left_at = 100.0  # DHT time at which this peer entered epoch 5
    records = [
        Record(b"me", epoch=5, samples_accumulated=8),
        Record(b"newcomer", epoch=4, samples_accumulated=0, time=left_at + 0.1),  # downloaded epoch 4's state late
        Record(b"dead", epoch=4, samples_accumulated=24, time=left_at - 0.5),  # stopped reporting before we left
    ]
    assert count_expected_peers(records, local_epoch=5, last_round_peers={b"me"}, epoch_started_at=left_at) == 2
    assert count_expected_peers(records, local_epoch=5, last_round_peers={b"me"}) == 1  # no time given: as before
