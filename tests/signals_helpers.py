"""A tool or example run in its own session (its own process group, as in a terminal), with private temporary
directories, so that a test can signal the whole group like Ctrl-C does and then list what it left behind."""

import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from typing import List, Optional, Set

import psutil

P2PD_SOCKET = re.compile(r"-listen=/unix(/\S+/hivemind-p2pd-([\w-]+)\.sock)")

# a fake P2P._connect for the launched script: Ctrl-C reaches the process group after p2pd reported ready and before
# the client opened its persistent connection (p2pd then exits on SIGINT); the start-up goes on once p2pd is gone
CTRL_C_WHILE_P2PD_STARTS = textwrap.dedent(
    """
    import asyncio, os, signal, time
    from hivemind.p2p import p2p_daemon

    _original_connect = p2p_daemon.P2P._connect

    async def _connect_after_ctrl_c(self, *args, **kwargs):
        os.killpg(0, signal.SIGINT)
        deadline = time.monotonic() + 10
        while self._daemon.is_running and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return await _original_connect(self, *args, **kwargs)

    p2p_daemon.P2P._connect = _connect_after_ctrl_c
    """
)


class SessionProcess:
    """``python -c script`` in a new session; stdout and stderr lines are collected (merged) by a thread."""

    def __init__(self, script: str, *, cwd: Optional[str] = None):
        self.tmp_dir = tempfile.mkdtemp(prefix="signals-test-")
        self.shm_dir = tempfile.mkdtemp(prefix="signals-test-", dir="/dev/shm")  # pipe files need a tmpfs
        env = dict(os.environ, TMPDIR=self.tmp_dir, HIVEMIND_P2P_SHM_DIR=self.shm_dir, HIVEMIND_COLORS="0")
        env["PYTHONUNBUFFERED"] = "1"
        self.process = subprocess.Popen(
            [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
            start_new_session=True, cwd=cwd,
        )  # fmt: skip
        self.lines: List[str] = []
        self._new_lines: queue.Queue[Optional[str]] = queue.Queue()
        self.p2pd_sockets: Set[str] = set()  # the Unix sockets of p2pd and its clients seen in the session
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._watch_p2pd, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self._new_lines.put(line.rstrip("\n"))
        self._new_lines.put(None)

    def _watch_p2pd(self) -> None:
        while self.process.poll() is None:
            for process in self.session_processes():
                try:
                    cmdline = " ".join(process.cmdline())
                except psutil.Error:
                    continue
                for match in P2PD_SOCKET.finditer(cmdline):
                    self.p2pd_sockets.update({match.group(1), match.group(1).replace("-p2pd-", "-p2pclient-")})
                try:  # e.g. the callback sockets of P2P replicas in the averager and handler processes
                    listening = [connection.laddr for connection in process.net_connections(kind="unix")]
                except psutil.Error:
                    continue
                self.p2pd_sockets.update(path for path in listening if "/hivemind-" in path)
            time.sleep(0.02)

    def session_processes(self) -> List[psutil.Process]:
        found = []
        for process in psutil.process_iter():
            try:
                if os.getsid(process.pid) == self.process.pid and process.status() != psutil.STATUS_ZOMBIE:
                    found.append(process)
            except (OSError, psutil.Error):
                continue
        return found

    def wait_for(self, pattern: str, timeout: float = 60) -> re.Match:
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        for line in self.lines:
            if regex.search(line):
                return regex.search(line)
        while time.monotonic() < deadline:
            try:
                line = self._new_lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                self._new_lines.put(None)
                break
            self.lines.append(line)
            if regex.search(line):
                return regex.search(line)
        raise AssertionError(f"no line matching {pattern!r} within {timeout} s; output:\n" + "\n".join(self.lines))

    def signal_group(self, signal_number: int) -> None:
        """What a terminal does on Ctrl-C (SIGINT), or a service manager on stop (SIGTERM): signal every process."""
        os.killpg(self.process.pid, signal_number)

    def finish(self, timeout: float = 30) -> int:
        """Wait for the exit code and collect the rest of the output."""
        returncode = self.process.wait(timeout=timeout)
        while True:
            line = self._new_lines.get(timeout=10)
            if line is None:
                return returncode
            self.lines.append(line)

    def leftovers(self, grace: float = 5) -> List[str]:
        """Processes of the session still running and files our code created that are still there (after ``grace``
        seconds for the processes of a session whose leader exited to end)."""
        deadline = time.monotonic() + grace
        while self.session_processes() and time.monotonic() < deadline:
            time.sleep(0.05)
        found = [f"process {process.pid} {process.cmdline()}" for process in self.session_processes()]
        for directory in (self.tmp_dir, self.shm_dir):
            found += [f"file {name}" for name in os.listdir(directory) if name.startswith(("hivemind", "pymp"))]
        return found + [f"socket {path}" for path in sorted(self.p2pd_sockets) if os.path.exists(path)]

    def close(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.process.wait()
        shutil.rmtree(self.tmp_dir, ignore_errors=True)
        shutil.rmtree(self.shm_dir, ignore_errors=True)
        for path in self.p2pd_sockets:
            try:
                os.unlink(path)
            except OSError:
                pass

    def output(self) -> str:
        return "\n".join(self.lines)


def tool_script(module: str, args: List[str], injected: str = "") -> str:
    """Code that runs ``hivemind.hivemind_cli.<module>.main(args)`` as the tool does, after ``injected`` code."""
    return f"{injected}\nimport sys\nfrom hivemind.hivemind_cli import {module}\nsys.exit({module}.main({args!r}))\n"
