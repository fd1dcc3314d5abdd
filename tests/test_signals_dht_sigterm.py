"""A DHT process that gets SIGTERM (a service manager stopping the program's process group, or multiprocessing's
terminate() of a forgotten daemonic DHT at exit) stops its node first: no p2pd, socket or pipe file is left."""

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
from signals_helpers import P2PD_SOCKET, SessionProcess, tool_script

import hivemind


def p2pd_of(dht: hivemind.DHT) -> psutil.Process:
    (daemon,) = [
        child for child in psutil.Process(dht.pid).children() if P2PD_SOCKET.search(" ".join(child.cmdline()))
    ]
    return daemon


def sockets_of(dht: hivemind.DHT, daemon: psutil.Process) -> list:
    control_socket = P2PD_SOCKET.search(" ".join(daemon.cmdline())).group(1)
    return [dht._socket_address, control_socket, control_socket.replace("-p2pd-", "-p2pclient-")]


def wait_gone(daemon: psutil.Process, timeout: float = 10) -> bool:
    try:
        daemon.wait(timeout)
        return True
    except psutil.TimeoutExpired:
        return False


@pytest.mark.timeout(30)
def test_terminated_dht_process_stops_its_node_and_removes_its_sockets():
    dht = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    daemon = p2pd_of(dht)
    sockets = sockets_of(dht, daemon)
    try:
        assert all(os.path.exists(path) for path in sockets)
        dht.terminate()
        dht.join(10)
        assert dht.exitcode == 0  # it shut down by itself (a killed process reports -15)
        assert wait_gone(daemon)
        assert [path for path in sockets if os.path.exists(path)] == []
    finally:
        dht.shutdown()


@pytest.mark.timeout(30)
def test_dht_whose_p2pd_died_first_still_removes_its_callback_socket():
    """As when SIGTERM reaches p2pd a moment before the DHT process: the node's shutdown still cleans up."""
    dht = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    daemon = p2pd_of(dht)
    sockets = sockets_of(dht, daemon)
    try:
        daemon.terminate()
        assert wait_gone(daemon)
        deadline = time.monotonic() + 5  # until the DHT process noticed (it logs that p2pd stopped)
        while os.path.exists(sockets[1]) and time.monotonic() < deadline:
            time.sleep(0.01)
        dht.shutdown()
        assert dht.exitcode == 0
        assert [path for path in sockets if os.path.exists(path)] == []
    finally:
        dht.shutdown()


@pytest.mark.timeout(60)
def test_hivemind_dht_stopped_by_sigterm_to_its_process_group_leaves_nothing_behind():
    tool = SessionProcess(tool_script("run_dht", ["--host_maddrs", "/ip4/127.0.0.1/tcp/0", "--refresh_period", "1"]))
    try:
        tool.wait_for(r"local routing table")
        tool.signal_group(signal.SIGTERM)
        assert tool.finish() == 0, tool.output()
        assert "Caught signal 15 (Terminated), shutting down" in tool.output()
        assert "Traceback" not in tool.output() and "ERROR" not in tool.output(), tool.output()  # p2pd got it too
        assert tool.leftovers() == [], tool.output()
    finally:
        tool.close()


@pytest.mark.timeout(30)
def test_sigterm_after_the_loop_closed_ends_the_process_without_a_traceback():
    """A late terminate() (the clean-up over, the loop closed) ends the process instead of raising in its handler."""
    script = (
        "import asyncio, os, signal\n"
        "from hivemind.utils.graceful_sigterm import GracefulSigterm\n"
        "loop = asyncio.new_event_loop()\n"
        "handler = GracefulSigterm(loop, asyncio.Event(), grace=10).install()\n"
        "handler.serving()\n"
        "loop.close()\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"
        "print('still running')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=20)
    assert result.returncode == -signal.SIGTERM, result.stderr
    assert result.stdout == "" and "Traceback" not in result.stderr
