"""ProgressTracker measures this peer's training speed from its first progress report, not from its creation."""

import time

import pytest

from hivemind.dht import DHT
from hivemind.optim.epoch_rule import summarize_swarm
from hivemind.optim.progress_tracker import LocalTrainingProgress, ProgressTracker


@pytest.fixture
def dht():
    dht = DHT(start=True)
    yield dht
    dht.shutdown()


@pytest.mark.timeout(60)
def test_setup_time_before_the_first_report_does_not_count_as_training_time(dht):
    tracker = ProgressTracker(dht, "speed_run", target_batch_size=1000, start=False)
    time.sleep(2.0)  # a peer loads its data and model after creating the optimizer: not training
    tracker.report_local_progress(0, 8)  # the first step: its start is unknown, so it only starts the clock
    started = time.perf_counter()
    for samples in range(16, 8 * 6, 8):  # five more steps of 8 samples, about 0.1 s each
        time.sleep(0.1)
        tracker.report_local_progress(0, samples)
    true_speed = 40 / (time.perf_counter() - started)
    # with the 2 s of setup counted, the estimate stays far below the true speed for dozens of steps
    assert tracker.local_progress.samples_per_second > 0.5 * true_speed, (tracker.performance_ema, true_speed)
    assert tracker.local_progress.samples_per_second < 2.0 * true_speed


@pytest.mark.timeout(30)
def test_a_peer_that_has_not_measured_its_speed_publishes_a_tiny_positive_one():
    # 0.0 made trackers that divide by each peer's speed (OpenDiLoCo's) fail on every fresh peer's record
    dht = DHT(start=True)
    tracker = ProgressTracker(dht, "unmeasured", target_batch_size=100, start=False)
    try:
        assert 0 < tracker.local_progress.samples_per_second <= 1e-20
        tracker.report_local_progress(0, 4)  # the first report starts the clock: still nothing measured
        assert 0 < tracker.local_progress.samples_per_second <= 1e-20
    finally:
        tracker.shutdown()
        dht.shutdown()


def test_peers_that_have_not_measured_their_speed_give_no_eta():
    record = LocalTrainingProgress(peer_id=b"fresh", epoch=0, samples_accumulated=4, samples_per_second=1e-20,
                                   time=100.0, client_mode=False)  # fmt: skip
    progress = summarize_swarm([record], target_batch_size=64, now=100.0)
    assert progress.eta_next_epoch == float("inf")  # not 1e22 s (the log said "ETA 6e+21 s")
