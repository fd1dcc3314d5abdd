"""Subclass seams used by downstream optimizers (OpenDiLoCo): ProgressTracker._parse_swarm_progress_data and the
Optimizer's _make_state_averager / _make_gradient_averager / _make_progress_tracker factories."""

import dataclasses
import functools

import pytest
import torch
from optim_swarm_helpers import FAST_TRACKER, RegressionTask, dht_pair, make_optimizer, wait_for

from hivemind.optim.grad_averager import GradientAverager
from hivemind.optim.optimizer import Optimizer
from hivemind.optim.progress_tracker import GlobalTrainingProgress, LocalTrainingProgress, ProgressTracker
from hivemind.optim.state_averager import TrainingStateAverager

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
    trackers = [
        TaggingTracker(dht_pair[0], "seam_run", 100, expected_drift_peers=5, expected_drift_rate=0.4, **options)
    ]
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
        # (an override written after 1.1.12's parse computes the next fetch time from these too)
        assert (tagging.expected_drift_peers, tagging.expected_drift_rate) == (5, 0.4)
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


class OnceFailingTracker(ProgressTracker):
    """Its first aggregation fails (as OpenDiLoCo's does while a peer publishes samples_per_second=0)."""

    def __init__(self, *args, **kwargs):
        self.failures_left = 1
        super().__init__(*args, **kwargs)

    def _parse_swarm_progress_data(self, metadata) -> GlobalTrainingProgress:
        if self.failures_left > 0:
            self.failures_left -= 1
            raise ZeroDivisionError("not yet")
        return super()._parse_swarm_progress_data(metadata)


@pytest.mark.timeout(30)
def test_after_a_failed_parse_the_tracker_fetches_again_soon_and_reports_no_fresh_progress(dht_pair):
    plain = ProgressTracker(dht_pair[1], "seam_retry", 100, start=True, **FAST_TRACKER)
    flaky = None
    try:
        plain.report_local_progress(0, 7)
        wait_for(lambda: plain.fetched_global_progress_this_epoch.is_set())
        flaky = OnceFailingTracker(dht_pair[0], "seam_retry", 100, start=False, **FAST_TRACKER)
        flaky.start()
        wait_for(lambda: flaky.failures_left == 0)
        # (the failed fetch did not count as fresh progress; the refresh period, not a default 3 s, sets the retry)
        wait_for(lambda: flaky.global_progress.num_peers == 2, timeout=2.0)
        assert flaky.fetched_global_progress_this_epoch.is_set() and flaky.global_progress.samples_accumulated == 7
    finally:
        for tracker in (plain, flaky):
            if tracker is not None:
                tracker.shutdown(5)


class RecordingStateAverager(TrainingStateAverager):
    """Counts scheduler catch-ups through the overridable _update_scheduler."""

    def __init__(self, *, note: str, **kwargs):
        self.note, self.scheduler_updates = note, 0
        super().__init__(**kwargs)

    def _update_scheduler(self) -> None:
        self.scheduler_updates += 1
        super()._update_scheduler()


class RecordingGradientAverager(GradientAverager):
    pass


class RecordingTracker(ProgressTracker):
    def __init__(self, *, note: str, **kwargs):
        self.note = note
        super().__init__(**kwargs)


class SubclassedOptimizer(Optimizer):
    """Builds its parts with the factory hooks, passing one option of its own to each, and records the calls."""

    def __init__(self, **kwargs):
        self.hook_calls = []
        super().__init__(**kwargs)

    def _make_state_averager(self, **kwargs) -> TrainingStateAverager:
        self.hook_calls.append(("state_averager", sorted(kwargs)))
        return RecordingStateAverager(
            note="state", dht=self.dht, prefix=f"{self.run_id}_state_averager", start=True,
            min_matchmaking_time=self.matchmaking_time, allreduce_timeout=self.allreduce_timeout,
            next_chunk_timeout=self.next_chunk_timeout, shutdown_timeout=self.shutdown_timeout,
            offload_optimizer=self.offload_optimizer, custom_gradients=self.offload_optimizer,
            status_loglevel=self.status_loglevel, client_mode=self.client_mode, auxiliary=self.auxiliary, **kwargs,
        )  # fmt: skip

    def _make_gradient_averager(self, factory, **kwargs) -> GradientAverager:
        self.hook_calls.append(("gradient_averager", sorted(kwargs)))
        assert factory is None  # (no grad_averager_factory given)
        # (a value this partial sets wins over the same option in averager_opts)
        return super()._make_gradient_averager(
            functools.partial(RecordingGradientAverager, request_timeout=0.5), **kwargs
        )

    def _make_progress_tracker(self, target_batch_size: int, **kwargs) -> ProgressTracker:
        self.hook_calls.append(("progress_tracker", sorted(kwargs)))
        return RecordingTracker(
            note="tracker", dht=self.dht, prefix=self.run_id, target_batch_size=target_batch_size, start=True, **kwargs
        )

    def _maybe_schedule_state_averaging(self) -> None:
        self.hook_calls.append(("schedule_state", self.local_epoch))
        super()._maybe_schedule_state_averaging()

    def _maybe_schedule_gradient_averaging(self) -> None:
        self.hook_calls.append(("schedule_grads", self.local_epoch))
        super()._maybe_schedule_gradient_averaging()


@pytest.mark.timeout(120)
def test_an_optimizer_subclass_builds_its_own_parts_and_two_peers_train_together(dht_pair):
    torch.manual_seed(0)
    task = RegressionTask()
    scheduler = lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)  # noqa: E731
    opts = []
    try:
        opts.append(make_optimizer(dht_pair[0], task.models[0], "seams", scheduler=scheduler))
        opts.append(
            SubclassedOptimizer(
                dht=dht_pair[1], run_id="seams", target_batch_size=8, batch_size_per_step=4,
                optimizer=lambda params: torch.optim.SGD(params, lr=0.1), params=task.models[1].parameters(),
                scheduler=scheduler, matchmaking_time=1.0, averaging_timeout=5.0, tracker_opts=FAST_TRACKER,
                averager_opts=dict(request_timeout=0.5),
            )
        )  # fmt: skip
        plain, custom = opts
        assert type(custom.state_averager) is RecordingStateAverager and custom.state_averager.note == "state"
        assert type(custom.grad_averager) is RecordingGradientAverager
        assert type(custom.tracker) is RecordingTracker and custom.tracker.note == "tracker"
        assert type(plain.state_averager) is TrainingStateAverager and type(plain.tracker) is ProgressTracker
        calls = dict(call for call in custom.hook_calls if call[0].endswith(("averager", "tracker")))
        assert {"optimizer", "params", "scheduler", "compression", "request_timeout"} <= set(calls["state_averager"])
        assert calls["gradient_averager"] == ["compression", "reuse_grad_buffers"]  # as 1.1.12 passes them
        assert custom.grad_averager.request_timeout == 0.5  # (the factory's, not averager_opts')
        assert set(calls["progress_tracker"]) >= {"performance_ema_alpha", "min_refresh_period"}
        assert custom._schema_hash == custom._compute_schema_hash() == plain._compute_schema_hash()

        wait_for(lambda: all(opt.tracker.global_progress.num_peers == 2 for opt in opts))
        task.train_concurrently(opts, epochs=2)
        assert ("schedule_state", 0) in custom.hook_calls and ("schedule_grads", 0) in custom.hook_calls
        assert custom.state_averager.scheduler_updates > 0
        assert all(task.full_loss(model) < task.initial_loss for model in task.models)
    finally:
        for opt in opts:
            opt.shutdown()


def test_check_kwargs_refuses_names_the_optimizer_does_not_know():
    check = SubclassedOptimizer._check_kwargs
    check(object.__new__(SubclassedOptimizer), dict(target_batch_size=8, verbose=True))
    with pytest.raises(TypeError, match="not_an_option"):
        check(object.__new__(SubclassedOptimizer), dict(not_an_option=1, verbose=True))
