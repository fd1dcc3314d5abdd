"""Creating and shutting down DHTs and averagers over and over in one process leaks no descriptors, threads or child
processes; shutdown() may be called twice and from several threads at once."""

import collections
import os
import threading

import psutil
import pytest
import torch

from hivemind.averaging import DecentralizedAverager
from hivemind.dht import DHT
from hivemind.utils.timed_storage import get_dht_time

LOCALHOST = dict(host_maddrs=["/ip4/127.0.0.1/tcp/0"])


def resources():
    """Open descriptors, threads (by name) and live child processes (pids) of this process."""
    children = [child for child in psutil.Process().children(recursive=True) if child.status() != psutil.STATUS_ZOMBIE]
    threads = collections.Counter(thread.name for thread in threading.enumerate())
    return len(os.listdir("/proc/self/fd")), threads, {child.pid for child in children}


def assert_nothing_added_since(before) -> None:
    """Nothing more than ``before``; fewer is fine: what an earlier test in the same worker left (an executor thread
    told to stop without waiting, a child still exiting) may end while this test runs."""
    fds, threads, children = resources()
    assert fds <= before[0], f"{fds - before[0]} more open file descriptors"
    assert not threads - before[1], f"more threads: {threads - before[1]}"
    assert not children - before[2], f"more child processes: {children - before[2]}"


@pytest.mark.timeout(90)
def test_dht_created_and_shut_down_repeatedly_leaks_nothing():
    def cycle(index: int) -> None:
        dht = DHT(start=True, **LOCALHOST)
        assert dht.store("key", index, get_dht_time() + 30)
        dht.shutdown()

    cycle(0)  # (first-use costs, e.g. lazily created helpers)
    before = resources()
    for index in range(1, 13):
        cycle(index)
    assert_nothing_added_since(before)


@pytest.mark.timeout(90)
def test_averager_created_and_shut_down_repeatedly_leaks_nothing():
    with DHT(start=True, **LOCALHOST) as dht:

        def cycle(index: int) -> None:
            averager = DecentralizedAverager([torch.zeros(3)], dht, prefix=f"again{index}", start=True)
            assert averager.get_group_bits() == ""
            averager.shutdown()

        cycle(0)
        before = resources()
        for index in range(1, 13):
            cycle(index)
        assert_nothing_added_since(before)


@pytest.mark.timeout(60)
def test_shutdown_twice_and_from_threads_at_once_is_quiet():
    dht = DHT(start=True, **LOCALHOST)
    averager = DecentralizedAverager([torch.zeros(3)], dht, prefix="twice", start=True)
    for handle in (averager, dht):
        threads = [threading.Thread(target=handle.shutdown) for _ in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert not any(thread.is_alive() for thread in threads), f"{type(handle).__name__}.shutdown() hung"
        handle.shutdown()
        assert handle.exitcode == 0
