"""The epoch progress bar counts samples, and an overdue epoch's ETA reads "now", not a negative time."""

import logging
import types

import pytest

from hivemind.optim.epoch_rule import GlobalTrainingProgress
from hivemind.optim.progress_bar import EpochProgressBar
from hivemind.optim.progress_tracker import ProgressTracker
from hivemind.utils.timed_storage import get_dht_time


def _overdue_progress() -> GlobalTrainingProgress:
    return GlobalTrainingProgress(
        epoch=3,
        samples_accumulated=2_757_898,
        target_batch_size=4_000_000,
        num_peers=2,
        num_clients=0,
        eta_next_epoch=get_dht_time() - 5.0,
        next_fetch_time=get_dht_time() + 1.0,
    )


@pytest.mark.timeout(10)
def test_progress_bar_counts_samples_and_never_shows_negative_eta():
    bar = EpochProgressBar("run", enabled=True)
    try:
        bar.update(_overdue_progress(), local_epoch=3)
        assert bar._bar.unit == "samples" and bar._bar.unit_scale
        assert "eta=0.0s" in bar._bar.postfix and "-" not in bar._bar.postfix
    finally:
        bar.close()


@pytest.mark.timeout(10)
def test_status_line_of_an_overdue_epoch_says_eta_now():
    progress = _overdue_progress()
    tracker_like = types.SimpleNamespace(global_progress=progress, status_loglevel=logging.INFO, prefix="run")
    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    tracker_logger = logging.getLogger("hivemind.optim.progress_tracker")
    tracker_logger.addHandler(handler)
    try:
        ProgressTracker._log_status(tracker_like)
    finally:
        tracker_logger.removeHandler(handler)
    assert len(lines) == 1 and "ETA now" in lines[0] and "-" not in lines[0], lines
