"""StepControl: one averaging step's state, shared between the user's process and the averager's process."""

import math
import multiprocessing as mp

import pytest

from hivemind.averaging.control import AveragingStage, StepControl
from hivemind.utils.mpfuture import MPFuture
from hivemind.utils.timed_storage import get_dht_time

START_METHODS = ["fork", "spawn"]


def _make_control(**overrides) -> StepControl:
    options = dict(
        scheduled_time=get_dht_time() + 1, deadline=None, allow_retries=True, weight=1.0, data_for_gather=b"payload"
    )
    options.update(overrides)
    return StepControl(**options)


def _averager_side(control, report, go):
    """What the averager's process does with a control: read the user's settings, publish its progress."""
    seen = (
        type(control).__name__,
        control.weight,
        control.scheduled_time,
        control.data_for_gather,
        control.deadline,
        control.allow_retries,
        control.triggered,
    )
    control.stage = AveragingStage.AWAITING_TRIGGER
    report.set_result(seen)
    if not go.wait(20):
        return
    control.stage = AveragingStage.RUNNING_ALLREDUCE
    control.set_result({"peer": control.weight})


@pytest.mark.timeout(60)
@pytest.mark.parametrize("start_method", START_METHODS)
def test_control_crosses_processes_with_its_shared_state(start_method):
    control, report = _make_control(scheduled_time=123.5, deadline=456.0, weight=2.0), MPFuture()
    go = mp.get_context(start_method).Event()
    process = mp.get_context(start_method).Process(target=_averager_side, args=(control, report, go))
    process.start()
    assert report.result(timeout=30) == ("StepControl", 2.0, 123.5, b"payload", 456.0, True, False)
    assert control.stage == AveragingStage.AWAITING_TRIGGER  # set by the other process
    control.weight = 3.0  # seen by the other process without any message
    go.set()
    assert control.result(timeout=30) == {"peer": 3.0}
    assert control.began_allreduce
    process.join(10)


def test_trigger_is_released_once():
    control = _make_control()
    assert not control.triggered
    control.allow_allreduce()
    assert control.triggered


def test_stage_running_allreduce_marks_began_allreduce():
    control = _make_control()
    assert control.stage == AveragingStage.IDLE and not control.began_allreduce
    control.stage = AveragingStage.LOOKING_FOR_GROUP
    assert not control.began_allreduce
    control.stage = AveragingStage.RUNNING_ALLREDUCE
    assert control.began_allreduce


@pytest.mark.parametrize("weight", [-1.0, math.inf, math.nan])
def test_invalid_weight_is_refused(weight):
    control = _make_control()
    with pytest.raises(ValueError, match="weight"):
        control.weight = weight


def test_get_timeout_counts_down_to_zero():
    assert _make_control().get_timeout() is None
    assert 9 < _make_control(deadline=get_dht_time() + 10).get_timeout() <= 10
    assert _make_control(deadline=get_dht_time() - 5).get_timeout() == 0


def test_cancel_makes_the_future_cancelled():
    control = _make_control()
    assert control.cancel()
    assert control.cancelled() and control.done()


def test_late_changes_only_warn(caplog):
    control = _make_control()
    control.stage = AveragingStage.RUNNING_ALLREDUCE
    control.scheduled_time = get_dht_time() + 100
    control.weight = 5.0
    assert control.weight == 5.0
    assert "no effect" in caplog.text
