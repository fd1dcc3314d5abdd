"""A ``background_server`` whose creating process is killed (SIGKILL: no clean-up runs) stops within seconds, with its
DHT process and p2pd, even when a worker that the creator forked inside the block lives on: the worker's copy of the
creator's end of the server's pipe hid the end of the creator, and the server ran for as long as the worker did."""

import json
import subprocess
import sys
import textwrap
import time

import pytest

from tests.freeze import still_running

SCRIPT = textwrap.dedent(
    """
    import json, multiprocessing as mp, os, signal, sys, time

    import psutil

    from hivemind.moe.server import background_server

    if __name__ == "__main__":
        mp.set_start_method(sys.argv[1])
        with background_server(expert_uids=["ffn.0"], hidden_dim=8, host_maddrs=["/ip4/127.0.0.1/tcp/0"]):
            worker = mp.get_context("fork").Process(target=time.sleep, args=(60,))  # e.g. a data loader's worker
            worker.start()
            # (not multiprocessing's resource tracker, started for spawn: it lives as long as the worker does)
            server = [
                child.pid
                for child in psutil.Process().children(recursive=True)
                if child.pid != worker.pid and "resource_tracker" not in " ".join(child.cmdline())
            ]
            print(json.dumps([worker.pid, server]), flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
    """
)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_background_server_stops_when_its_creator_is_killed_while_a_forked_worker_lives(tmp_path, start_method):
    script = tmp_path / "user_script.py"
    script.write_text(SCRIPT)
    with open(tmp_path / "stdout", "w") as stdout, open(tmp_path / "stderr", "w") as stderr:
        # (not through pipes: the children inherit the script's stdout, and reading it to its end would wait for them)
        process = subprocess.Popen([sys.executable, str(script), start_method], stdout=stdout, stderr=stderr)
        process.wait(timeout=90)
    lines = (tmp_path / "stdout").read_text().splitlines()
    assert lines, f"the script failed before killing itself: {(tmp_path / 'stderr').read_text()[-3000:]}"
    worker, server = json.loads(lines[-1])
    try:
        assert len(server) >= 3, server  # the server's process, its DHT process and the DHT's p2pd (at least)
        started = time.monotonic()
        survivors = still_running(server, timeout=15)
        assert survivors == [], f"still running {time.monotonic() - started:.0f} s after the creator was killed"
    finally:
        still_running([worker], timeout=0)
