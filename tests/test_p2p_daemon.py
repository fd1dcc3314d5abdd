"""Daemon lifecycle: start-up (and its errors), addresses, identities, peers, shutdown and idle exit."""

import asyncio
import logging
import os
import socket
import stat
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from hivemind.p2p import P2P, P2PDaemonError, PeerID
from hivemind.p2p.daemon_binary import get_p2pd_path

pytestmark = pytest.mark.timeout(60)

SOME_PEER = "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"


def socket_files(p2p: P2P):
    token = str(p2p.daemon_listen_maddr).split("hivemind-p2pd-")[1]
    return [f"/tmp/hivemind-p2pd-{token}", f"/tmp/hivemind-p2pclient-{token}"]


def wait_until_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
            return True
        time.sleep(0.05)
    return False


async def test_create_reports_peer_id_and_visible_maddrs(p2p_factory):
    p2p = await p2p_factory()
    assert isinstance(p2p.peer_id, PeerID) and p2p.is_alive
    maddrs = await p2p.get_visible_maddrs()
    assert maddrs and all(str(m).endswith(f"/p2p/{p2p.peer_id}") for m in maddrs)
    assert all(str(m).startswith("/ip4/127.0.0.1/tcp/") for m in maddrs)
    assert [str(m) for m in await p2p.get_visible_maddrs(latest=True)] == [str(m) for m in maddrs]


async def test_no_visible_maddrs_is_a_value_error(p2p_factory):
    p2p = await p2p_factory(host_maddrs=[], no_listen=True)
    with pytest.raises(ValueError, match="no addresses"):
        await p2p.get_visible_maddrs()


async def test_shutdown_leaves_no_process_and_no_socket_files():
    p2p = await P2P.create()
    pid = p2p._daemon.pid
    paths = socket_files(p2p)
    assert all(os.path.exists(path) for path in paths)
    await p2p.shutdown()
    assert not p2p.is_alive
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert not any(os.path.exists(path) for path in paths)
    await p2p.shutdown()  # idempotent


async def test_shutdown_leaves_no_pending_tasks():
    before = asyncio.all_tasks()
    p2p = await P2P.create()
    await p2p.shutdown()
    assert asyncio.all_tasks() == before


async def test_port_in_use_error_quotes_the_daemon():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(P2PDaemonError, match="exited with code 1.*address already in use"):
            await P2P.create(host_maddrs=[f"/ip4/127.0.0.1/tcp/{port}"])


async def test_bad_multiaddr_error_quotes_the_daemon():
    with pytest.raises(P2PDaemonError, match="tcpx"):
        await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcpx/0"])


async def test_bad_identity_file_error_quotes_the_daemon(tmp_path):
    path = tmp_path / "identity.key"
    path.write_bytes(b"definitely not a key")
    with pytest.raises(P2PDaemonError, match="identity"):
        await P2P.create(identity_path=str(path))


async def test_startup_timeout_kills_a_silent_daemon(tmp_path, monkeypatch):
    fake = tmp_path / "p2pd"
    fake.write_text("#!/bin/sh\necho 'warming up'\nexec sleep 30\n")
    fake.chmod(0o755)
    monkeypatch.setenv("HIVEMIND_P2PD_PATH", str(fake))
    started = time.monotonic()
    with pytest.raises(P2PDaemonError, match="startup_timeout=0.5.*warming up"):
        await P2P.create(startup_timeout=0.5)
    assert time.monotonic() - started < 5
    sleepers = [p for p in psutil.Process().children(recursive=True) if "sleep" in p.name()]
    assert not [p for p in sleepers if p.status() != psutil.STATUS_ZOMBIE]


async def test_initial_peers_and_use_ipfs_are_exclusive():
    with pytest.raises(AssertionError):
        await P2P.create(
            initial_peers=["/ip4/127.0.0.1/tcp/1/p2p/QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"], use_ipfs=True
        )


async def test_announce_maddr_with_port_zero_is_rejected():
    with pytest.raises(ValueError, match="port 0"):
        await P2P.create(announce_maddrs=["/ip4/127.0.0.1/tcp/0"])


async def test_deprecated_options_warn(p2p_factory):
    with pytest.warns(DeprecationWarning, match="quic"):
        await p2p_factory(quic=True)


async def test_announce_maddrs_replace_visible_addresses(p2p_factory):
    p2p = await p2p_factory(announce_maddrs=["/ip4/8.8.8.8/tcp/31337"])
    assert [str(m) for m in await p2p.get_visible_maddrs()] == [f"/ip4/8.8.8.8/tcp/31337/p2p/{p2p.peer_id}"]


async def test_identity_file_is_created_and_reused(tmp_path, p2p_factory):
    path = str(tmp_path / "identity.key")
    first = await p2p_factory(identity_path=path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o400
    first_id = first.peer_id
    await first.shutdown()
    second = await p2p_factory(identity_path=path)
    assert second.peer_id == first_id
    with open(path, "rb") as file:
        assert PeerID.from_identity(file.read()) == first_id


async def test_identity_in_use_by_a_live_peer_is_refused(tmp_path, p2p_factory):
    path = str(tmp_path / "identity.key")
    P2P.generate_identity(path)
    owner = await p2p_factory(identity_path=path)
    initial_peers = await owner.get_visible_maddrs()
    assert await P2P.is_identity_taken(
        path, initial_peers=initial_peers, tls=True, use_auto_relay=False, use_ipfs=False, use_relay=True
    )
    with pytest.raises(P2PDaemonError, match="already online"):
        await p2p_factory(identity_path=path, initial_peers=initial_peers)


async def test_free_identity_is_not_reported_taken(tmp_path, p2p_factory):
    path = str(tmp_path / "identity.key")
    P2P.generate_identity(path)
    bootstrap = await p2p_factory()
    p2p = await p2p_factory(identity_path=path, initial_peers=await bootstrap.get_visible_maddrs())
    with open(path, "rb") as file:
        assert p2p.peer_id == PeerID.from_identity(file.read())


async def test_list_peers_and_wait_for_peers(p2p_pair):
    first, second = p2p_pair
    assert [info.peer_id for info in await first.list_peers()] == [second.peer_id]
    assert [info.peer_id for info in await second.list_peers()] == [first.peer_id]
    assert str((await second.list_peers())[0]).startswith(str(first.peer_id))
    await second.wait_for_at_least_n_peers(1)
    with pytest.raises(RuntimeError, match="Not enough peers"):
        await second.wait_for_at_least_n_peers(2, attempts=2, delay=0.01)


async def test_daemon_exits_on_idle_timeout_without_persistent_connection(tmp_path):
    listen = f"/unix/{tmp_path}/p2pd.sock"
    process = subprocess.Popen(
        [get_p2pd_path(), f"-listen={listen}", "-hostAddrs=/ip4/127.0.0.1/tcp/0", "-idleTimeout=1s"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert process.wait(timeout=10) is not None
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


CHILD_WITHOUT_CLEANUP = textwrap.dedent(
    """
    import asyncio, os, sys
    from hivemind.p2p import P2P

    async def main():
        p2p = await P2P.create(idle_timeout=1)
        print(p2p._daemon.pid, str(p2p.daemon_listen_maddr), flush=True)
        if sys.argv[1] == "crash":
            os._exit(0)  # no atexit, no finalizers: only the daemon's own rules can clean up
        # "exit": leave without shutdown(); the atexit finalizer must stop the daemon

    asyncio.run(main())
    """
)


@pytest.mark.parametrize("how", ["exit", "crash"])
def test_daemon_does_not_outlive_its_python_process(how):
    """Interpreter exit without shutdown() runs the finalizer; a hard crash closes the persistent connection,
    and p2pd exits when its last persistent connection closes."""
    result = subprocess.run(
        [sys.executable, "-c", CHILD_WITHOUT_CLEANUP, how], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    pid_text, listen_maddr = result.stdout.split()
    assert wait_until_gone(int(pid_text), timeout=10)
    daemon_socket = listen_maddr[len("/unix") :]
    client_socket = daemon_socket.replace("hivemind-p2pd-", "hivemind-p2pclient-")
    assert not os.path.exists(daemon_socket)  # removed by the finalizer, or by p2pd itself after a crash
    if how == "exit":
        assert not os.path.exists(client_socket)
    elif os.path.exists(client_socket):
        os.unlink(client_socket)  # nothing survives os._exit to remove the client's own callback socket


async def test_missing_daemon_binary_is_reported(monkeypatch, tmp_path):
    monkeypatch.setenv("HIVEMIND_P2PD_PATH", str(tmp_path / "no-such-p2pd"))
    with pytest.raises(P2PDaemonError, match="no-such-p2pd"):
        await P2P.create()


class RecordingHandler(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)


async def test_daemon_output_is_forwarded_to_the_logger():
    daemon_logger = logging.getLogger("hivemind.p2p.daemon_process")
    handler, previous_level = RecordingHandler(), daemon_logger.level
    daemon_logger.addHandler(handler)
    daemon_logger.setLevel(logging.DEBUG)
    try:
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            with pytest.raises(P2PDaemonError):
                await P2P.create(host_maddrs=[f"/ip4/127.0.0.1/tcp/{busy.getsockname()[1]}"])
    finally:
        daemon_logger.removeHandler(handler)
        daemon_logger.setLevel(previous_level)
    errors = [r for r in handler.records if r.levelno == logging.ERROR]
    assert any("address already in use" in r.getMessage() for r in errors)
    assert all(r.getMessage().startswith("p2pd") for r in handler.records)
