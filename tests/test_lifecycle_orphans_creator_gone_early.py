"""The creator of a DHT process started with 'spawn' is SIGKILLed before that process has even set up its watch of
its creator, while a process forked from the creator lives (holding copies of the DHT's pipes and of the parent
sentinel): the DHT process ends (with its p2pd) instead of watching for a change of its parent that already
happened."""

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

    from hivemind.dht import DHT

    if __name__ == "__main__":
        mp.set_start_method("spawn")
        dht = DHT(start=False, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
        dht.start()  # (not run_in_background: the creator is killed while the spawned child still imports)
        worker = os.fork()
        if worker == 0:
            time.sleep(60)
            os._exit(0)
        print(json.dumps({"dht": dht.pid, "worker": worker}), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """
)


@pytest.mark.timeout(90)
def test_spawned_dht_ends_when_its_creator_was_killed_before_it_watched_it(tmp_path):
    script = tmp_path / "user_script.py"
    script.write_text(SCRIPT)
    with open(tmp_path / "stdout", "w") as stdout, open(tmp_path / "stderr", "w") as stderr:
        # (not through pipes: the worker would hold them open for its whole life)
        subprocess.Popen([sys.executable, str(script)], stdout=stdout, stderr=stderr, cwd=tmp_path).wait(timeout=60)
    lines = (tmp_path / "stdout").read_text().splitlines()
    assert lines, f"the script failed before starting the DHT: {(tmp_path / 'stderr').read_text()[-3000:]}"
    pids = json.loads(lines[-1])
    try:
        assert psutil.pid_exists(pids["worker"])
        dht = psutil.Process(pids["dht"])
        # let it start (and its p2pd), then it must end once it sees that its creator is gone
        ours = [pids["dht"]]
        try:
            psutil.wait_procs([dht], timeout=15)
            ours += [child.pid for child in dht.children(recursive=True)]
        except psutil.NoSuchProcess:
            pass
        assert still_running(ours, timeout=15) == []
    finally:
        try:
            psutil.Process(pids["worker"]).send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
