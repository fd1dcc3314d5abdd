"""A signal handler that calls DHT.shutdown() while the main thread's shutdown() is sending the shutdown request to
the DHT process: the nested call returns at once (it waited forever for the lock held by the interrupted send).
Any other call made there fails at once with a NestedCallError saying what to do (it waited forever too)."""

import os
import signal

import pytest

from hivemind.dht import DHT
from hivemind.dht.process_channel import NestedCallError
from hivemind.utils import get_dht_time


class _SignalOnSend:  # the DHT's pipe, whose send is interrupted by a signal (after taking the channel's send lock)
    def __init__(self, connection):
        self._connection = connection

    def __getattr__(self, name):
        return getattr(self._connection, name)

    def send(self, message):
        os.kill(os.getpid(), signal.SIGUSR1)  # (its handler runs at the next line of Python code, right here)
        self._connection.send(message)


@pytest.mark.timeout(30)
def test_dht_shutdown_from_a_signal_handler_during_its_request_send_returns():
    dht = DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    handled = []

    def handler(signum, frame):
        dht.shutdown()
        handled.append(signum)

    previous = signal.signal(signal.SIGUSR1, handler)
    try:
        caller = dht._callers[os.getpid()]
        caller._connection = _SignalOnSend(caller._connection)
        dht.shutdown()
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert handled == [signal.SIGUSR1]
    assert not dht.is_alive() and dht.exitcode == 0, dht.exitcode


@pytest.mark.timeout(30)
def test_averager_shutdown_from_a_signal_handler_during_its_request_send_returns():
    import torch

    from hivemind.averaging import DecentralizedAverager

    dht = DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    averager = DecentralizedAverager([torch.zeros(3)], dht, prefix="nested", start=True)
    handled = []

    def handler(signum, frame):
        averager.shutdown()
        handled.append(signum)

    previous = signal.signal(signal.SIGUSR1, handler)
    try:
        averager._caller._connection = _SignalOnSend(averager._caller._connection)
        averager.shutdown()
    finally:
        signal.signal(signal.SIGUSR1, previous)
        dht.shutdown()
    assert handled == [signal.SIGUSR1]
    assert not averager.is_alive() and averager.exitcode == 0, averager.exitcode


@pytest.mark.timeout(60)
def test_a_dht_call_from_a_signal_handler_during_another_calls_send_fails_at_once_and_both_stay_usable():
    dht = DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    try:
        outcomes = []

        def handler(signum, frame):
            try:
                outcomes.append(dht.get("nested-key", latest=True))
            except NestedCallError as e:
                outcomes.append(e)

        previous = signal.signal(signal.SIGUSR1, handler)
        caller = dht._callers[os.getpid()]
        plain_connection = caller._connection
        try:
            caller._connection = _SignalOnSend(plain_connection)
            stored = dht.store("outer-key", 123, expiration_time=get_dht_time() + 60)
        finally:
            caller._connection = plain_connection
            signal.signal(signal.SIGUSR1, previous)
        assert stored is True  # the interrupted call was sent whole and answered
        assert len(outcomes) == 1 and isinstance(outcomes[0], NestedCallError), outcomes
        assert "signal handler" in str(outcomes[0]) and "flag" in str(outcomes[0])
        # the channel is intact: later calls, one from a handler that interrupted no send included, work as usual
        assert dht.get("outer-key", latest=True).value == 123
        signal.signal(signal.SIGUSR1, handler)
        try:
            os.kill(os.getpid(), signal.SIGUSR1)
        finally:
            signal.signal(signal.SIGUSR1, previous)
        assert outcomes[1] is None  # nothing stored under that key: an answer, not an error
    finally:
        dht.shutdown()


def _first_call_interrupted_by_a_handler_that_calls(dht, results):  # in a forked process: its first DHT call
    import hivemind.dht.dht as dht_module

    plain_connect, interrupted = dht_module.connect_to_dht_process, []

    def connect_interrupted_once(*args):  # the signal lands while this thread connects (holding the connect lock)
        if not interrupted:
            interrupted.append(True)
            os.kill(os.getpid(), signal.SIGUSR1)
        return plain_connect(*args)

    def handler(signum, frame):
        results.put(("handler", dht.get("outer-key", latest=True).value))

    dht_module.connect_to_dht_process = connect_interrupted_once
    signal.signal(signal.SIGUSR1, handler)
    results.put(("main", dht.get("outer-key", latest=True).value))
    results.put(("connections", len({id(caller) for caller in dht._callers.values()})))


@pytest.mark.timeout(60)
def test_a_dht_call_from_a_signal_handler_during_the_first_call_of_a_forked_process_connecting_is_answered():
    import multiprocessing as mp

    dht = DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    try:
        assert dht.store("outer-key", 7, expiration_time=get_dht_time() + 60)
        context = mp.get_context("fork")
        results = context.Queue()
        child = context.Process(target=_first_call_interrupted_by_a_handler_that_calls, args=(dht, results))
        child.start()
        child.join(20)
        hung = child.is_alive()
        if hung:  # it waited for the connect lock that its interrupted thread held
            child.kill()
            child.join()
        assert not hung and child.exitcode == 0, child.exitcode
        outcomes = dict(results.get(timeout=5) for _ in range(3))
        # both answered; one connection kept for this process (next to the origin's pipe)
        assert outcomes == {"handler": 7, "main": 7, "connections": 2}, outcomes
    finally:
        dht.shutdown()
