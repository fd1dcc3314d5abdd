"""background_server under the 'forkserver' start method, its creator SIGKILLed while a process forked from it lives:
the server process (a child of the fork server, which that process keeps alive) ends with its DHT and p2pd, instead
of spinning at 100% CPU forever on its creator's readable pidfd."""

import json
import signal
import subprocess
import sys
import textwrap

import psutil
import pytest

from tests.freeze import still_running

SCRIPT = textwrap.dedent(
    """
    import json, os, signal, time
    import multiprocessing as mp

    import psutil

    from hivemind.moe.server import background_server

    if __name__ == "__main__":
        mp.set_start_method("forkserver")
        with background_server(num_experts=1, hidden_dim=8, num_handlers=1, host_maddrs=["/ip4/127.0.0.1/tcp/0"]):
            (server,) = mp.active_children()
            ours = [server.pid] + [child.pid for child in psutil.Process(server.pid).children(recursive=True)]
            worker = os.fork()
            if worker == 0:
                time.sleep(60)
                os._exit(0)
            print(json.dumps({"ours": ours, "worker": worker}), flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
    """
)


@pytest.mark.timeout(90)
def test_forkserver_background_server_ends_when_its_creator_is_killed_while_its_forked_worker_lives(tmp_path):
    script = tmp_path / "user_script.py"
    script.write_text(SCRIPT)
    with open(tmp_path / "stdout", "w") as stdout, open(tmp_path / "stderr", "w") as stderr:
        # (not through pipes: the worker would hold them open for its whole life)
        subprocess.Popen([sys.executable, str(script)], stdout=stdout, stderr=stderr, cwd=tmp_path).wait(timeout=60)
    lines = (tmp_path / "stdout").read_text().splitlines()
    assert lines, f"the script failed before starting the server: {(tmp_path / 'stderr').read_text()[-3000:]}"
    pids = json.loads(lines[-1])
    try:
        assert len(pids["ours"]) >= 3, pids  # the server's process, its DHT process and p2pd
        assert psutil.pid_exists(pids["worker"])  # it keeps the fork server and a copy of the server's pipe alive
        assert still_running(pids["ours"], timeout=10) == []
    finally:
        try:
            psutil.Process(pids["worker"]).send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
