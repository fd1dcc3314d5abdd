"""ProgressTracker: progress records on the DHT (their exact encoding) and the swarm's progress seen by each peer."""

import threading
import time

import pytest
from optim_swarm_helpers import dht_pair, started_trackers, wait_for

from hivemind.dht.crypto import RSASignatureValidator
from hivemind.optim.progress_tracker import LocalTrainingProgress, ProgressTracker
from hivemind.utils.serializer import MSGPackSerializer
from hivemind.utils.timed_storage import get_dht_time

__all__ = ["dht_pair"]  # the fixture, used by the tests below

FAST = dict(min_refresh_period=0.05, max_refresh_period=0.2, default_refresh_period=0.1)


def test_record_encoding_matches_the_wire_vector():
    record = LocalTrainingProgress(
        peer_id=bytes.fromhex("1220"),
        epoch=3,
        samples_accumulated=10,
        samples_per_second=1.5,
        time=1700000000.0,
        client_mode=False,
    )
    expected = (
        "86a7706565725f6964c4021220a565706f636803b373616d706c65735f616363756d756c617465640ab273616d706c65735f70"
        "65725f7365636f6e64cb3ff8000000000000a474696d65cb41d954fc40000000ab636c69656e745f6d6f6465c2"
    )
    assert MSGPackSerializer.dumps(record.dict()).hex() == expected


@pytest.mark.parametrize(
    "field, value", [("epoch", -1), ("epoch", 1.0), ("samples_per_second", 1), ("client_mode", 0), ("time", "0")]
)
def test_record_fields_are_strict(field, value):
    fields = dict(peer_id=b"x", epoch=0, samples_accumulated=0, samples_per_second=0.0, time=0.0, client_mode=False)
    with pytest.raises(ValueError):
        LocalTrainingProgress(**{**fields, field: value})


@pytest.mark.timeout(60)
def test_two_trackers_see_each_others_samples_and_reach_the_target(dht_pair):
    with started_trackers(dht_pair, target_batch_size=100) as (first, second):
        first.report_local_progress(0, 30)
        second.report_local_progress(0, 50)
        wait_for(lambda: first.global_progress.samples_accumulated == 80 and first.global_progress.num_peers == 2)
        assert not first.ready_to_update_epoch or first.estimated_next_update_time <= get_dht_time()
        second.report_local_progress(0, 70)
        wait_for(lambda: first.global_progress.samples_accumulated >= 100)
        assert first.ready_to_update_epoch


@pytest.mark.timeout(60)
def test_update_epoch_moves_to_the_swarm_epoch_and_others_follow(dht_pair):
    with started_trackers(dht_pair, target_batch_size=10) as (first, second):
        with first.pause_updates():
            assert first.update_epoch() == 1
        wait_for(lambda: second.global_epoch == 1)
        assert second.ready_to_update_epoch  # another peer is ahead
        with second.pause_updates():
            assert second.update_epoch() == 1  # max(local + 1, global)
        assert second.local_progress.samples_accumulated == 0
        wait_for(lambda: second.fetched_global_progress_this_epoch.is_set())


def test_update_epoch_outside_pause_updates_is_refused(dht_pair):
    tracker = ProgressTracker(dht_pair[0], "run", target_batch_size=10, start=False)
    with pytest.raises(RuntimeError, match="pause_updates"):
        tracker.update_epoch()


@pytest.mark.timeout(60)
def test_shutdown_publishes_none_so_others_stop_counting_the_peer(dht_pair):
    with started_trackers(dht_pair, target_batch_size=100) as (first, second):
        second.report_local_progress(0, 40)
        wait_for(lambda: first.global_progress.num_peers == 2)
        second.shutdown(5)
        assert not second.is_alive()
        wait_for(lambda: first.global_progress.num_peers == 1 and first.global_progress.samples_accumulated == 0)


@pytest.mark.timeout(60)
def test_records_are_signed_and_a_forged_record_is_refused(dht_pair):
    tracker = ProgressTracker(dht_pair[0], "run", target_batch_size=100, start=True, **FAST)
    dht_pair[1].add_validators([RSASignatureValidator()])  # a reader that checks and strips signatures
    try:
        tracker.report_local_progress(0, 5)

        def record_with_five_samples():
            # the tracker's first record (0 samples, published at start) may still be the one a reader sees
            found = dht_pair[1].get("run_progress", latest=True)
            values = [] if found is None else [entry.value for entry in found.value.values()]
            return any(isinstance(v, dict) and v.get("samples_accumulated") == 5 for v in values)

        wait_for(record_with_five_samples)
        entries = dht_pair[1].get("run_progress", latest=True).value
        (subkey,) = entries
        assert subkey.startswith(b"[owner:ssh-rsa ")
        assert entries[subkey].value["samples_accumulated"] == 5
        # another peer without that key cannot write under this subkey
        forged = dict(entries[subkey].value, samples_accumulated=10**6)
        assert not dht_pair[1].store("run_progress", forged, get_dht_time() + 30, subkey=subkey)
    finally:
        tracker.shutdown(5)


def test_tracker_refuses_nonpositive_target(dht_pair):
    with pytest.raises(ValueError, match="target_batch_size"):
        ProgressTracker(dht_pair[0], "run", target_batch_size=0, start=False)


@pytest.mark.timeout(60)
def test_refresh_global_progress_sees_a_peer_that_joined_since_the_last_fetch(dht_pair):
    slow = dict(min_refresh_period=0.05, max_refresh_period=100, default_refresh_period=100)
    first = ProgressTracker(dht_pair[0], "run", target_batch_size=100, start=True, **slow)
    second = None
    try:
        wait_for(lambda: first.fetched_global_progress_this_epoch.is_set())
        second = ProgressTracker(dht_pair[1], "run", target_batch_size=100, start=True, **FAST)
        second.report_local_progress(0, 10)
        stored = lambda: dht_pair[0].get("run_progress", latest=True)  # noqa: E731
        wait_for(lambda: stored() is not None and len(stored().value) == 2)
        assert first.global_progress.num_peers == 1  # the next periodic fetch is 100 s away
        assert first.refresh_global_progress(timeout=10)
        assert first.global_progress.num_peers == 2
    finally:
        first.shutdown(5)
        if second is not None:
            second.shutdown(5)


@pytest.mark.timeout(60)
def test_a_long_pause_of_updates_does_not_stall_the_tracker_thread(dht_pair):
    """An epoch's averaging round runs inside pause_updates (up to averaging_timeout): meanwhile the tracker's thread
    stays responsive, so that shutdown() from another thread stops it at once and its None record goes out."""
    with started_trackers(dht_pair, target_batch_size=100) as (first, second):
        second.report_local_progress(0, 40)
        wait_for(lambda: first.global_progress.num_peers == 2)
        paused, release = threading.Event(), threading.Event()

        def long_round():
            with second.pause_updates():
                paused.set()
                release.wait(30)

        round_thread = threading.Thread(target=long_round)
        round_thread.start()
        try:
            assert paused.wait(10)
            time.sleep(1.0)  # several refresh periods: the tracker's fetches come due meanwhile
            started = time.monotonic()
            second.shutdown(5)
            assert time.monotonic() - started < 2.0 and not second.is_alive()
            wait_for(lambda: first.global_progress.num_peers == 1, timeout=5)
        finally:
            release.set()
            round_thread.join(10)


@pytest.mark.timeout(60)
def test_refresh_options_can_be_changed_on_a_running_tracker(dht_pair):
    """As in hivemind 1.1.12, code may set a tracker's refresh options after creating it (e.g. in a subclass); the
    next fetch follows them, and a value the policy cannot take is refused at once."""
    with started_trackers(dht_pair, target_batch_size=100) as (first, second):
        first.max_refresh_period, first.default_refresh_period = 30.0, 30.0
        first.min_refresh_period, first.expected_drift_rate, first.expected_drift_peers = 20.0, 0.5, 7
        assert (first.min_refresh_period, first.max_refresh_period, first.expected_drift_peers) == (20.0, 30.0, 7)
        assert first.refresh_policy.expected_drift_rate == 0.5
        second.report_local_progress(0, 10)
        assert first.refresh_global_progress(timeout=10)
        assert first.global_progress.next_fetch_time - get_dht_time() >= 15  # within [min, max] = [20, 30] s
        with pytest.raises(ValueError):
            first.min_refresh_period = 40.0  # above max_refresh_period
        assert first.min_refresh_period == 20.0
