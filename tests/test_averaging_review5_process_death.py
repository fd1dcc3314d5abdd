"""A step in progress fails (instead of waiting forever) when the averager's process dies without shutdown()."""

import os
import signal

import pytest
import torch
from averager_helpers import averagers_on, dht_swarm, wait_for_stage

from hivemind.averaging.control import AveragingStage
from hivemind.averaging.partition import AllreduceException


@pytest.mark.timeout(60)
@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_a_running_step_fails_when_the_averagers_process_is_killed(start_method):
    with dht_swarm(1) as dhts, averagers_on(dhts, [[torch.zeros(3)]], start_method=start_method) as (averager,):
        control = averager.step(wait=False)  # alone: it looks for a group until it is stopped
        wait_for_stage([control], AveragingStage.LOOKING_FOR_GROUP)
        os.kill(averager.pid, signal.SIGKILL)
        with pytest.raises(AllreduceException, match="process exited unexpectedly"):
            control.result(timeout=10)
