"""Shutting down a process that attached to a DHT's p2pd (an averager, a connection handler, a user process that
called replicate_p2p) removes the Unix socket its P2P client listened on: thousands were left in /tmp otherwise."""

import asyncio
import os
import subprocess
import sys
from typing import List

import pytest
import torch

from hivemind.averaging import DecentralizedAverager
from hivemind.dht import DHT
from hivemind.p2p import P2P
from hivemind.p2p.p2p_daemon_bindings.control import unix_socket_path


def p2p_client_sockets_of(pid: int) -> List[str]:
    """Paths of the hivemind P2P client sockets that process ``pid`` listens on (from /proc)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    paths = []
    with open(f"/proc/{pid}/net/unix") as table:
        next(table)
        for line in table:
            fields = line.split()
            if len(fields) >= 8 and fields[6] in inodes and "hivemind-p2pclient" in fields[7]:
                paths.append(fields[7])
    return paths


@pytest.mark.timeout(30)
def test_averager_shutdown_removes_its_p2p_client_socket():
    with DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"]) as dht:
        inherited = set(p2p_client_sockets_of(os.getpid()))  # a forked averager also holds this process's sockets
        averager = DecentralizedAverager([torch.zeros(3)], dht, prefix="sockets", start=True, target_group_size=2)
        sockets = [path for path in p2p_client_sockets_of(averager.pid) if path not in inherited]
        assert len(sockets) == 1, sockets
        averager.shutdown()
        assert averager.exitcode == 0
        assert not os.path.exists(sockets[0]), "the averager's P2P client socket was left behind"


REPLICA_SCRIPT = """
import asyncio

import hivemind
from hivemind.p2p.p2p_daemon_bindings.control import unix_socket_path

dht = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
replica = asyncio.run(dht.replicate_p2p())  # e.g. what RemoteExpert does in the user's process
print(unix_socket_path(replica._client_listen_maddr), flush=True)
dht.shutdown()
"""


@pytest.mark.timeout(60)
def test_replica_in_users_process_removes_its_socket_when_the_process_exits(tmp_path):
    script = tmp_path / "replica.py"
    script.write_text(REPLICA_SCRIPT)
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=50, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    path = result.stdout.strip().splitlines()[-1]
    assert path.startswith("/tmp/hivemind-p2pclient"), path
    leftover = os.path.exists(path)
    if leftover:
        os.unlink(path)
    assert not leftover, "the replica's P2P client socket outlived the process"


@pytest.mark.timeout(30)
async def test_dht_attached_to_users_p2p_removes_its_client_socket_at_shutdown():
    p2p = await P2P.create()
    try:
        inherited = set(p2p_client_sockets_of(os.getpid()))  # a forked DHT process also holds this process's
        assert unix_socket_path(p2p._client_listen_maddr) in inherited  # sockets, p2p's own and earlier tests' ones
        dht = DHT(start=True, p2p=p2p)
        sockets = [path for path in p2p_client_sockets_of(dht.pid) if path not in inherited]
        assert len(sockets) == 1, sockets
        await asyncio.get_running_loop().run_in_executor(None, dht.shutdown)
        assert dht.exitcode == 0
        assert not os.path.exists(sockets[0]), "the DHT process's P2P client socket was left behind"
        assert p2p.is_alive  # the user's daemon keeps running
    finally:
        await p2p.shutdown()
