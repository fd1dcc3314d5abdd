"""When the user's process is killed while a process it forked after starting hivemind's is still alive (a DataLoader
worker, a plain ``os.fork()``), the background processes (DHT, averager, connection handlers, background_server) and
their p2pd daemons still end within seconds: the worker holds copies of the parent's ends of their pipes, so those
never close, and the processes watch the parent itself."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import psutil
import pytest

from tests.freeze import still_running

SCRIPT = textwrap.dedent(
    """
    import json, multiprocessing as mp, os, signal, sys, time

    import psutil
    import torch

    import hivemind
    import hivemind.utils.process_handle
    from hivemind.moe.server import Server, background_server


    def idle_worker():
        time.sleep(60)


    if __name__ == "__main__":
        what, start_method, worker = sys.argv[1:4]
        if worker == "os_fork_without_pidfd":  # the children inherit this: they check their parent's pid instead
            hivemind.utils.process_handle._open_pidfd = lambda pid: None
        maddrs = ["/ip4/127.0.0.1/tcp/0"]
        if what == "averager":
            dht = hivemind.DHT(start=True, start_method=start_method, host_maddrs=maddrs)
            averager = hivemind.DecentralizedAverager(
                [torch.zeros(3)], dht, prefix="orphans", start=True, target_group_size=2, start_method=start_method
            )
        elif what == "server":
            server = Server.create(num_experts=1, hidden_dim=8, num_handlers=2, start=True, host_maddrs=maddrs)
        else:
            background = background_server(num_experts=1, hidden_dim=8, num_handlers=1, host_maddrs=maddrs)
            background.__enter__()
        ours = []
        for child in psutil.Process().children(recursive=True):
            command = " ".join(child.cmdline())  # (processes forked by the fork server share its command line)
            if child.ppid() != os.getpid() or not ("resource_tracker" in command or "forkserver" in command):
                ours.append(child.pid)  # not multiprocessing's own processes, shared with the worker
        if worker == "mp_worker":
            process = mp.get_context("fork").Process(target=idle_worker, daemon=True)
            process.start()
            worker_pid = process.pid
        else:
            worker_pid = os.fork()
            if worker_pid == 0:
                idle_worker()
                os._exit(0)
        print(json.dumps({"ours": ours, "worker": worker_pid}), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """
)


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    "what, start_method, worker",
    [
        ("averager", "fork", "mp_worker"),
        ("averager", "spawn", "os_fork"),
        ("averager", "forkserver", "os_fork"),
        ("averager", "fork", "os_fork_without_pidfd"),
        ("server", "fork", "os_fork"),
        ("background_server", "fork", "os_fork"),
    ],
)
def test_processes_end_when_their_creator_is_killed_while_its_forked_worker_lives(
    tmp_path, what, start_method, worker
):
    script = tmp_path / "user_script.py"
    script.write_text(SCRIPT)
    with open(tmp_path / "stdout", "w") as stdout, open(tmp_path / "stderr", "w") as stderr:
        # (not through pipes: the worker would hold them open for its whole life)
        process = subprocess.Popen(
            [sys.executable, str(script), what, start_method, worker], stdout=stdout, stderr=stderr, cwd=tmp_path
        )
        process.wait(timeout=60)
    lines = (tmp_path / "stdout").read_text().splitlines()
    assert lines, f"the script failed before starting its processes: {(tmp_path / 'stderr').read_text()[-3000:]}"
    pids = json.loads(lines[-1])
    try:
        assert len(pids["ours"]) >= 3, pids  # at least a DHT process, its p2pd and one more process
        assert psutil.pid_exists(pids["worker"])  # the worker still holds its copies of the pipes
        assert still_running(pids["ours"], timeout=10) == []
    finally:
        try:
            os.kill(pids["worker"], signal.SIGKILL)
        except ProcessLookupError:
            pass
