"""shutdown() of a DHT or an averager called from several threads at once stops the process once, quietly: of two
threads joining the same child, one reaped it and the other's ``waitpid`` found no such child, so that thread took
the process for alive, warned that it "did not shut down" and sent SIGTERM to a pid that might be another process's
(a warning in about one concurrent shutdown in four)."""

import os
import signal
import threading

import pytest
import torch

from hivemind.averaging import DecentralizedAverager
from hivemind.dht import DHT

LOCALHOST = dict(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
ROUNDS = 4


def _shut_down_from_threads(handle, num_threads: int = 3) -> None:
    errors = []

    def shut_down() -> None:
        try:
            handle.shutdown()
        except BaseException as e:  # e.g. a pipe closed by two threads at once: "Bad file descriptor"
            errors.append(e)

    threads = [threading.Thread(target=shut_down) for _ in range(num_threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not any(thread.is_alive() for thread in threads), f"{type(handle).__name__}.shutdown() hung"
    assert not errors, errors


@pytest.mark.timeout(120)
def test_concurrent_shutdowns_stop_the_process_once_without_warnings(hivemind_warnings):
    for index in range(ROUNDS):
        dht = DHT(start=True, **LOCALHOST)
        averager = DecentralizedAverager([torch.zeros(3)], dht, prefix=f"concurrent{index}", start=True)
        for handle in (averager, dht):
            _shut_down_from_threads(handle)
            assert handle.exitcode == 0, f"{type(handle).__name__} was terminated"
    assert not [message for message in hivemind_warnings if "did not shut down" in message], hivemind_warnings


def _left_for_join(process) -> bool:
    """The ended process is still a zombie: only its own join() (in shutdown()) reaps it."""
    return os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


@pytest.mark.timeout(60)
def test_calls_that_check_the_process_leave_an_ended_one_for_shutdown_to_reap():
    dht = DHT(start=True, **LOCALHOST)
    averager = DecentralizedAverager([torch.zeros(3)], dht, prefix="peek", start=True)
    try:
        for handle in (averager, dht):
            os.kill(handle.pid, signal.SIGKILL)
            os.waitid(os.P_PID, handle.pid, os.WEXITED | os.WNOWAIT)  # until it ended
        averager.state_sharing_priority = 2.0  # tells the averager's process only if it runs
        assert _left_for_join(averager)
        with pytest.raises(RuntimeError, match="has ended .killed by signal 9"):
            dht.add_validators([])
        assert _left_for_join(dht)
    finally:
        averager.shutdown()
        dht.shutdown()
    assert averager.exitcode == dht.exitcode == -signal.SIGKILL
