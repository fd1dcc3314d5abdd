"""ProgressTracker measures this peer's training speed from its first progress report, not from its creation."""

import time

import pytest

from hivemind.dht import DHT
from hivemind.optim.progress_tracker import ProgressTracker


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
