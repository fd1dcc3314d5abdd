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


@pytest.mark.timeout(60)
def test_a_step_the_killed_process_never_took_fails_with_the_same_error():
    """The step's request may still be unanswered when the process dies (the stage is in shared memory, the answer
    still on its way): the step failed then with the channel's error or the exit description, whichever came first."""
    with dht_swarm(1) as dhts, averagers_on(dhts, [[torch.zeros(3)]]) as (averager,):
        os.kill(averager.pid, signal.SIGKILL)
        averager._state_thread.join(20)  # the thread that fails the running steps saw the process end: none ran
        assert not averager._state_thread.is_alive()
        control = averager.step(wait=False)  # its request finds the channel closed
        with pytest.raises(AllreduceException, match=r"process exited unexpectedly \(exit code -9\)"):
            control.result(timeout=10)
