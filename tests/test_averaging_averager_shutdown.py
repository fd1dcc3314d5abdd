"""DecentralizedAverager.shutdown() ends the averager's process on its own and promptly: idle, in the middle of an
all-reduce, and when its DHT process does not answer (the state-sharing withdrawal is only a courtesy)."""

import os
import resource
import signal
import time

import psutil
import pytest
import torch
from averager_helpers import averagers_on, dht_swarm

from hivemind.averaging.control import AveragingStage
from hivemind.averaging.partition import AllreduceException


def _timed_shutdown(averager) -> float:
    started = time.perf_counter()
    averager.shutdown()
    return time.perf_counter() - started


def _wait_for_stage(control, stage, timeout=30.0):
    deadline = time.monotonic() + timeout
    while control.stage != stage:  # a shared-memory read
        assert time.monotonic() < deadline, control.stage
        time.sleep(0.01)


@pytest.mark.timeout(60)
def test_idle_averager_shuts_down_promptly():
    with dht_swarm(1) as dhts, averagers_on(dhts, [[torch.zeros(100)]]) as (averager,):
        elapsed = _timed_shutdown(averager)
        assert averager.exitcode == 0  # ended on its own, not terminated
        assert elapsed < 1.5, f"an idle averager took {elapsed:.2f} s to shut down"


def _cpu_seconds_of_reaped_children() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@pytest.mark.timeout(60)
def test_spawned_averager_exits_without_finalizing_its_interpreter():
    # a spawned process used to tear down the whole interpreter (torch included) after its clean-up: ~0.9 s when idle
    # on a 2-core machine, past shutdown_timeout under load. That teardown costs the child ~0.8 s of CPU time, the
    # prompt exit ~0.05 s: CPU time is counted, since on a loaded machine even the prompt exit took 0.8 s of wall time
    with dht_swarm(1) as dhts, averagers_on(dhts, [[torch.zeros(100)]], start_method="spawn") as (averager,):
        times = psutil.Process(averager.pid).cpu_times()
        cpu_before = times.user + times.system  # of all the child's threads; it has no children of its own
        reaped_before = _cpu_seconds_of_reaped_children()
        elapsed = _timed_shutdown(averager)
        assert averager.exitcode == 0, f"the averager's process was terminated after {elapsed:.2f} s"
        shutdown_cpu = _cpu_seconds_of_reaped_children() - reaped_before - cpu_before
        assert shutdown_cpu < 0.3, f"a spawned idle averager spent {shutdown_cpu:.2f} s of CPU time shutting down"


@pytest.mark.timeout(60)
def test_averager_shuts_down_promptly_during_an_allreduce():
    tensors = [[torch.zeros(1000)], [torch.ones(1000)]]
    with dht_swarm(2) as dhts, averagers_on(dhts, tensors, target_group_size=2) as averagers:
        controls = [averager.step(wait=False, require_trigger=True, timeout=60) for averager in averagers]
        for control in controls:
            _wait_for_stage(control, AveragingStage.AWAITING_TRIGGER)
        controls[0].allow_allreduce()  # peer 0 starts its all-reduce and waits for the parts of peer 1
        _wait_for_stage(controls[0], AveragingStage.RUNNING_ALLREDUCE)
        elapsed = _timed_shutdown(averagers[0])
        assert averagers[0].exitcode == 0
        assert elapsed < 2.0, f"an averager in an all-reduce took {elapsed:.2f} s to shut down"
        with pytest.raises(AllreduceException):
            controls[0].result(timeout=1)


@pytest.mark.timeout(60)
def test_averager_shuts_down_on_its_own_when_its_dht_process_hangs():
    with dht_swarm(1) as dhts, averagers_on(dhts, [[torch.zeros(100)]]) as (averager,):
        os.kill(dhts[0].pid, signal.SIGSTOP)  # the withdrawal of the state-sharing declaration gets no answer
        try:
            elapsed = _timed_shutdown(averager)
        finally:
            os.kill(dhts[0].pid, signal.SIGCONT)
        assert averager.exitcode == 0, "the averager's process had to be terminated"
        assert elapsed < 0.8 * averager.shutdown_timeout, f"shutdown took {elapsed:.2f} s"
