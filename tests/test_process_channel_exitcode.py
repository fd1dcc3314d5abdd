"""The reader thread of a process channel tells how the other process ended without reaping it: the user's thread
may be in ``join()`` at that moment, and a second ``waitpid`` of the same child makes multiprocessing report exit
code None for a process that exited (the averager SIGTERM test failed so about 1 run in 20)."""

import multiprocessing as mp
import os
import signal
import threading
import time

import pytest

from hivemind.dht.process_channel import exitcode_of


def _exit_with(code: int) -> None:
    os._exit(code)


def _sleep_forever() -> None:
    threading.Event().wait()


def _told_within(ask, timeout: float):
    """The child's pipes close a moment before the kernel has its exit status: ask until it is told."""
    deadline = time.monotonic() + timeout
    while (code := ask()) is None and time.monotonic() < deadline:
        time.sleep(0.01)
    return code


@pytest.mark.timeout(30)
@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_exitcode_is_told_without_reaping_the_process(start_method):
    process = mp.get_context(start_method).Process(target=_exit_with, args=(3,))
    process.start()
    assert _told_within(exitcode_of(process), 20) == 3
    # the exited child is still there for its own Popen to reap: join() reports its code
    assert os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    process.join(5)
    assert process.exitcode == 3
    assert exitcode_of(process)() == 3  # once reaped, the code multiprocessing keeps


@pytest.mark.timeout(30)
def test_exitcode_is_none_while_running_and_the_signal_once_killed():
    process = mp.get_context("fork").Process(target=_sleep_forever, daemon=True)
    process.start()
    try:
        assert exitcode_of(process)() is None
        os.kill(process.pid, signal.SIGKILL)
        assert _told_within(exitcode_of(process), 20) == -signal.SIGKILL
        process.join(5)
        assert process.exitcode == -signal.SIGKILL
    finally:
        process.kill()
        process.join(5)


@pytest.mark.timeout(60)
def test_killed_averager_is_left_for_join_to_reap():
    """The averager's state thread fails the running steps when its process dies; it must not reap the process, or a
    join() in the user's thread at the same moment reports exit code None."""
    import torch

    import hivemind
    from hivemind.averaging import DecentralizedAverager

    dht = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    averager = DecentralizedAverager([torch.zeros(3)], dht, prefix="exitcode_peek", start=True, target_group_size=2)
    try:
        os.kill(averager.pid, signal.SIGKILL)
        averager._state_thread.join(20)  # it saw the pipe close and described the exit
        assert not averager._state_thread.is_alive()
        assert os.waitid(os.P_PID, averager.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
        averager.join(10)
        assert averager.exitcode == -signal.SIGKILL
    finally:
        averager.shutdown()
        dht.shutdown()
