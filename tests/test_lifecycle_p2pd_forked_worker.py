"""A P2P created in the user's own process: when that process is killed while a process forked from it later (a
DataLoader worker, a plain ``os.fork()``) is still alive, its p2pd ends within seconds and removes its socket. The
worker holds a copy of the persistent connection (whose closing otherwise ends the daemon); p2pd watches the process
that started it instead (HIVEMIND_P2PD_PARENT_PID)."""

import glob
import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap

import psutil
import pytest

from tests.freeze import still_running

SCRIPT = textwrap.dedent(
    """
    import asyncio, json, os, signal, time

    import psutil

    import hivemind


    async def main():
        p2p = await hivemind.P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
        daemons = [child.pid for child in psutil.Process().children()]
        worker = os.fork()
        if worker == 0:
            time.sleep(60)
            os._exit(0)
        print(json.dumps({"daemons": daemons, "worker": worker, "pid": os.getpid()}), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)


    asyncio.run(main())
    """
)


@pytest.mark.timeout(60)
def test_p2pd_ends_when_its_creator_is_killed_while_its_forked_worker_lives(tmp_path):
    script = tmp_path / "user_script.py"
    script.write_text(SCRIPT)
    with open(tmp_path / "stdout", "w") as stdout, open(tmp_path / "stderr", "w") as stderr:
        # (not through pipes: the worker would hold them open for its whole life)
        subprocess.Popen([sys.executable, str(script)], stdout=stdout, stderr=stderr, cwd=tmp_path).wait(timeout=30)
    lines = (tmp_path / "stdout").read_text().splitlines()
    assert lines, f"the script failed before starting p2pd: {(tmp_path / 'stderr').read_text()[-3000:]}"
    pids = json.loads(lines[-1])
    try:
        assert len(pids["daemons"]) == 1, pids
        assert psutil.pid_exists(pids["worker"])  # it still holds its copy of the persistent connection
        assert still_running(pids["daemons"], timeout=10) == []
        assert glob.glob(os.path.join(tempfile.gettempdir(), f"hivemind-p2pd-{pids['pid']}_*.sock")) == []
    finally:
        try:
            os.kill(pids["worker"], signal.SIGKILL)
        except ProcessLookupError:
            pass
