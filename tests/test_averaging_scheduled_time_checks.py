"""A step's scheduled time and timeout must be finite numbers: a NaN scheduled time made the search re-declare
itself in the DHT on every loop iteration (NaN never equals the declared value), and an infinite one declared an
expiration that every leader refuses, so the step could never find a group."""

import math

import pytest
import torch

from hivemind.averaging.averager import AveragerArgumentError
from hivemind.averaging.control import StepControl
from hivemind.utils.timed_storage import get_dht_time
from tests.averager_helpers import averagers_on, dht_swarm


def _control() -> StepControl:
    return StepControl(
        scheduled_time=get_dht_time() + 1, deadline=None, allow_retries=True, weight=1.0, data_for_gather=b"x"
    )


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_step_control_refuses_a_non_finite_scheduled_time(bad):
    control = _control()
    before = control.scheduled_time
    with pytest.raises(ValueError, match="scheduled_time"):
        control.scheduled_time = bad
    assert control.scheduled_time == before


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_step_control_constructor_refuses_a_non_finite_scheduled_time(bad):
    with pytest.raises(ValueError, match="scheduled_time"):
        StepControl(scheduled_time=bad, deadline=None, allow_retries=True, weight=1.0, data_for_gather=b"x")


@pytest.mark.timeout(30)
def test_averager_step_refuses_non_finite_scheduled_time_and_timeout():
    # (timeout=math.inf means no limit, as in hivemind 1.1.12: test_an_averager_step_with_an_infinite_timeout_averages)
    with dht_swarm(1) as dhts, averagers_on(dhts, [[torch.zeros(4)]]) as (averager,):
        for bad in (math.nan, math.inf):
            with pytest.raises(AveragerArgumentError, match="scheduled_time"):
                averager.step(scheduled_time=bad, wait=False)
        with pytest.raises(AveragerArgumentError, match="timeout"):
            averager.step(timeout=math.nan, wait=False)
        with pytest.raises(AveragerArgumentError, match="timeout"):
            averager.step(timeout=-1.0, wait=False)
