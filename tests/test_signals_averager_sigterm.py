"""An averager process that gets SIGTERM while it serves (a service manager stopping the program's process group, or
multiprocessing's terminate() of a forgotten daemonic averager at exit) closes its P2P replica before it exits."""

import os

import psutil
import pytest
import torch

import hivemind
from hivemind.averaging import DecentralizedAverager


@pytest.mark.timeout(40)
def test_terminated_averager_process_removes_its_callback_socket():
    dht = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    inherited = set(hivemind_sockets_of(os.getpid()))  # a forked averager also holds this process's sockets
    averager = DecentralizedAverager([torch.zeros(3)], dht, prefix="sigterm_averager", start=True, target_group_size=2)
    try:
        sockets = [path for path in hivemind_sockets_of(averager.pid) if path not in inherited]
        assert sockets  # the callback socket of its P2P replica
        averager.terminate()
        averager.join(10)
        assert averager.exitcode == 0  # it shut down by itself (a killed process reports -15)
        assert [path for path in sockets if os.path.exists(path)] == []
    finally:
        averager.shutdown()
        dht.shutdown()


def hivemind_sockets_of(pid: int) -> list:
    listening = [connection.laddr for connection in psutil.Process(pid).net_connections(kind="unix")]
    return [path for path in listening if "/hivemind-" in path]
