"""Creating and shutting down DHTs and averagers over and over in one process leaks no descriptors, threads or child
processes; shutdown() may be called twice and from several threads at once."""

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
    """Open descriptors, threads and live child processes of this process."""
    children = [child for child in psutil.Process().children(recursive=True) if child.status() != psutil.STATUS_ZOMBIE]
    return len(os.listdir("/proc/self/fd")), sorted(thread.name for thread in threading.enumerate()), len(children)


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
    assert resources() == before


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
        assert resources() == before


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
