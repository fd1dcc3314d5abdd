"""Subclass seams used by downstream optimizers (OpenDiLoCo): ProgressTracker._parse_swarm_progress_data and the
Optimizer's _make_state_averager / _make_gradient_averager / _make_progress_tracker factories."""

import dataclasses

import pytest
import torch
from optim_swarm_helpers import FAST_TRACKER, dht_pair, wait_for

from hivemind.optim.progress_tracker import GlobalTrainingProgress, LocalTrainingProgress, ProgressTracker

__all__ = ["dht_pair"]  # the fixture, used below


class TaggingTracker(ProgressTracker):
    """Aggregates as usual, then marks the result (num_clients=-1) and remembers the raw metadata it was given."""

    def __init__(self, *args, **kwargs):
        self.seen_metadata = []
        super().__init__(*args, **kwargs)

    def _parse_swarm_progress_data(self, metadata) -> GlobalTrainingProgress:
        self.seen_metadata.append(metadata)
        return dataclasses.replace(super()._parse_swarm_progress_data(metadata), num_clients=-1)


@pytest.mark.timeout(30)
def test_progress_tracker_aggregates_the_swarm_through_an_overridable_parse(dht_pair):
    options = dict(start=True, **FAST_TRACKER)
    trackers = [TaggingTracker(dht_pair[0], "seam_run", 100, **options)]
    trackers.append(ProgressTracker(dht_pair[1], "seam_run", 100, **options))
    try:
        tagging, plain = trackers
        plain.report_local_progress(0, 30)
        wait_for(lambda: tagging.global_progress.num_peers == 2 and tagging.global_progress.samples_accumulated == 30)
        assert tagging.global_progress.num_clients == -1  # the subclass's result is the tracker's progress
        metadata = next(m for m in reversed(tagging.seen_metadata) if len(m) == 2)
        records = [LocalTrainingProgress.parse_obj(entry.value) for entry in metadata.values()]
        assert sorted(record.samples_accumulated for record in records) == [0, 30]  # both peers' raw records

        tagging.report_local_progress(0, 5)  # local progress is aggregated through the override too
        assert tagging.global_progress.samples_accumulated == 35 and tagging.global_progress.num_clients == -1
        assert tagging.max_refresh_period == FAST_TRACKER["max_refresh_period"]
        assert tagging.min_refresh_period == FAST_TRACKER["min_refresh_period"]
        assert tagging.default_refresh_period == FAST_TRACKER["default_refresh_period"]
    finally:
        for tracker in trackers:
            tracker.shutdown(5)


class FailingTracker(ProgressTracker):
    def _parse_swarm_progress_data(self, metadata) -> GlobalTrainingProgress:
        raise ZeroDivisionError("a broken override")


@pytest.mark.timeout(30)
def test_a_failing_parse_override_keeps_the_last_progress_and_does_not_fail_the_report(dht_pair):
    tracker = FailingTracker(dht_pair[0], "seam_fail", 100, start=True, **FAST_TRACKER)
    try:
        before = tracker.global_progress
        tracker.report_local_progress(0, 10)  # must not raise into the training loop
        assert tracker.global_progress is before
        assert tracker.is_alive()
    finally:
        tracker.shutdown(5)


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(4, 1)
