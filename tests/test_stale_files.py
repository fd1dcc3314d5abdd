"""Files left behind by killed peers: the next P2P start removes stale sockets, its p2pd removes stale pipe files, and
nothing live is removed."""

import fcntl
import os
import secrets
import signal
import subprocess
import sys
import textwrap

import pytest

from hivemind.p2p import stale_sockets
from tests.async_wait import wait_until

pytestmark = pytest.mark.timeout(60)

LISTENER = textwrap.dedent(
    """
    import os, socket, sys, time
    path = sys.argv[1].replace("{pid}", str(os.getpid()))
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    print(path, flush=True)
    time.sleep(120)
    """
)


def start_listener(path_template: str) -> "tuple[subprocess.Popen, str]":
    """A process that listens on a Unix socket (``{pid}`` in the path becomes its pid); returns it and the path."""
    process = subprocess.Popen([sys.executable, "-c", LISTENER, path_template], stdout=subprocess.PIPE, text=True)
    return process, process.stdout.readline().strip()


def kill(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait()  # reaped: its pid is dead, not a zombie


def remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def dead_pid() -> int:
    """The pid of a process that has exited (and was reaped)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def socket_template(kind: str) -> str:
    return os.path.join(stale_sockets.P2P_SOCKET_DIR, f"hivemind-{kind}-{{pid}}_{secrets.token_hex(6)}.sock")


async def test_p2p_create_removes_socket_of_killed_process(p2p_factory):
    killed, stale_path = start_listener(socket_template("p2pclient"))
    kill(killed)  # SIGKILL runs no cleanup: the socket file stays
    assert os.path.exists(stale_path)
    try:
        await p2p_factory()
        assert not os.path.exists(stale_path)
    finally:
        remove(stale_path)


@pytest.mark.parametrize(
    "owner",
    [
        pytest.param(lambda: "{pid}", id="socket_of_live_process"),
        # a p2pd that outlived the process named in its socket (an orphan) still serves its socket: it must stay
        pytest.param(lambda: str(dead_pid()), id="listening_socket_whose_named_owner_died"),
    ],
)
async def test_p2p_create_keeps_a_listening_socket(p2p_factory, owner):
    live, live_path = start_listener(socket_template("p2pd").replace("{pid}", owner()))
    try:
        await p2p_factory()
        assert os.path.exists(live_path)
    finally:
        kill(live)
        remove(live_path)


def test_sweep_keeps_young_socket_without_pid_in_name(tmp_path):
    # a socket named without a pid (older versions, the DHT's) is left alone for a grace period, even unbound
    killed, path = start_listener(str(tmp_path / f"hivemind-dht-{secrets.token_hex(8)}.sock"))
    kill(killed)
    assert stale_sockets.sweep_stale_sockets([str(tmp_path)]) == 0
    os.utime(path, (0, 0))  # now older than the grace period
    assert stale_sockets.sweep_stale_sockets([str(tmp_path)]) == 1
    assert not os.path.exists(path)


async def test_p2pd_removes_pipe_files_of_dead_daemons_when_it_starts(p2p_factory, tmp_path, monkeypatch):
    monkeypatch.setenv("HIVEMIND_P2P_SHM_DIR", str(tmp_path))  # read by the daemon that p2p_factory starts
    dead = dead_pid()
    stale = tmp_path / f"hivemind-p2pd-{dead}-0123abcd"
    live = tmp_path / f"hivemind-p2pd-{os.getpid()}-0123abcd"
    other = tmp_path / f"unrelated-{dead}-0123abcd"
    # a daemon in another pid namespace that shares the tmpfs: its pid is dead here, but it holds the file's lock
    locked = tmp_path / f"hivemind-p2pd-{dead}-4567abcd"
    for path in (stale, live, other, locked):
        path.write_bytes(b"x")
    with open(locked, "rb") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_SH)
        await p2p_factory()  # opens no stream: the daemon sweeps at start, not only when it makes its first pipe
        await wait_until(lambda: not stale.exists(), "p2pd to remove the pipe file of a dead daemon")
        assert live.exists() and other.exists() and locked.exists()
