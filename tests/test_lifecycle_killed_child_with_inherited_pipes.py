"""Calls to a DHT or averager whose process was killed fail at once, even when another process forked by the user
holds a copy of that process's end of the pipes (it was forked after the DHT or averager was created and before it was
started): the end of the pipe alone is then never seen, and every call, and every running step, waited forever."""

import multiprocessing as mp
import os
import signal
import time

import pytest
import torch

from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.partition import AllreduceException
from hivemind.dht import DHT

LOCALHOST = ["/ip4/127.0.0.1/tcp/0"]
ANSWER_WITHIN = 10  # seconds; the failure takes well under a second


def _kill(process: mp.Process) -> None:
    os.kill(process.pid, signal.SIGKILL)
    process.join(10)
    assert process.exitcode == -signal.SIGKILL


def _sleep(seconds: float) -> None:
    time.sleep(seconds)


@pytest.mark.timeout(60)
def test_call_to_a_killed_dht_fails_while_another_dht_holds_a_copy_of_its_pipe():
    dhts = [DHT(start=False, host_maddrs=LOCALHOST) for _ in range(2)]
    try:
        for dht in dhts:  # the first DHT's process is forked while the second's pipe is open in the user's process
            dht.run_in_background()
        _kill(dhts[1])
        future = dhts[1].get("key", return_future=True)
        with pytest.raises(RuntimeError, match="killed by signal SIGKILL"):
            future.result(timeout=ANSWER_WITHIN)
        assert dhts[0].get("key") is None  # the other DHT works on
    finally:
        for dht in dhts:
            dht.shutdown()


@pytest.mark.timeout(60)
def test_call_to_a_killed_dht_fails_while_a_users_worker_holds_a_copy_of_its_pipe():
    dht = DHT(start=False, host_maddrs=LOCALHOST, start_method="spawn")
    worker = mp.get_context("fork").Process(target=_sleep, args=(60,), daemon=True)
    worker.start()  # forked between the DHT's creation and its start
    try:
        dht.run_in_background()
        pending = dht.get("key", return_future=True, latest=True)
        _kill(dht)
        # (the pipe may close before the exit status is known: the message need not name the signal)
        with pytest.raises(RuntimeError, match="DHT process ended before answering.*create a new DHT"):
            pending.result(timeout=ANSWER_WITHIN)
    finally:
        worker.kill()
        worker.join()
        dht.shutdown()


@pytest.mark.timeout(60)
def test_step_and_calls_of_a_killed_averager_fail_while_another_averager_holds_a_copy_of_its_pipes():
    with DHT(start=True, host_maddrs=LOCALHOST) as dht:
        options = dict(start=False, target_group_size=2, min_matchmaking_time=1.0)
        averagers = [DecentralizedAverager([torch.ones(3)], dht, prefix=p, **options) for p in ("first", "second")]
        try:
            for averager in averagers:  # the first one's process holds copies of the second one's pipes
                averager.run_in_background()
            victim = averagers[1]
            control = victim.step(wait=False)  # alone: it looks for a group until it is stopped
            _kill(victim)
            with pytest.raises(AllreduceException, match="process exited unexpectedly"):
                control.result(timeout=ANSWER_WITHIN)
            future = victim.get_group_bits(wait=False)
            with pytest.raises(RuntimeError, match="killed by signal SIGKILL"):
                future.result(timeout=ANSWER_WITHIN)
            assert averagers[0].get_group_bits() == ""  # the other averager works on
        finally:
            for averager in averagers:
                averager.shutdown()
