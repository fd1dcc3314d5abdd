"""When the user's process dies without any clean-up (SIGKILL, os._exit) or from an unhandled exception, the
background processes it started (DHT, averager, connection handlers) and their p2pd daemons end by themselves
within seconds instead of being orphaned, holding ports and CPU, forever."""

import json
import subprocess
import sys
import textwrap
from typing import List

import pytest

from tests.freeze import still_running

SCRIPT = textwrap.dedent(
    """
    import json, os, signal, sys

    import psutil
    import torch

    import hivemind
    from hivemind.moe.server import Server

    if __name__ == "__main__":
        what, start_method, how = sys.argv[1:4]
        if what == "averager":
            dht = hivemind.DHT(start=True, start_method=start_method, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
            averager = hivemind.DecentralizedAverager(
                [torch.zeros(3)], dht, prefix="orphans", start=True, target_group_size=2, start_method=start_method
            )
        elif what == "two_dhts":  # both created before either starts: each child inherits the other's pipe
            dhts = [hivemind.DHT(start=False, host_maddrs=["/ip4/127.0.0.1/tcp/0"]) for _ in range(2)]
            for dht in dhts:
                dht.run_in_background()
        elif what == "two_averagers":
            dht = hivemind.DHT(start=True, start_method=start_method, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
            options = dict(start=False, target_group_size=2, start_method=start_method)
            averagers = [hivemind.DecentralizedAverager([torch.ones(3)], dht, prefix=p, **options) for p in "ab"]
            for averager in averagers:
                averager.run_in_background()
        else:  # a server that serves from two connection handler processes
            server = Server.create(
                num_experts=1, hidden_dim=8, num_handlers=2, start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"]
            )
        print(json.dumps([child.pid for child in psutil.Process().children(recursive=True)]), flush=True)
        if how == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif how == "os_exit":
            os._exit(3)
        raise RuntimeError("an unhandled error in the user's script")
    """
)


def _die_and_list_children(tmp_path, *args: str) -> List[int]:
    """Run SCRIPT with ``args`` until it dies as told; returns the pids of the processes it had started."""
    script = tmp_path / "user_script.py"
    script.write_text(SCRIPT)
    with open(tmp_path / "stdout", "w") as stdout, open(tmp_path / "stderr", "w") as stderr:
        # (not through pipes: the children inherit the script's stdout, and reading it to its end would wait for them)
        process = subprocess.Popen([sys.executable, str(script), *args], stdout=stdout, stderr=stderr, cwd=tmp_path)
        process.wait(timeout=60)
    lines = (tmp_path / "stdout").read_text().splitlines()
    assert lines, f"the script failed before starting its processes: {(tmp_path / 'stderr').read_text()[-3000:]}"
    return json.loads(lines[-1])


@pytest.mark.timeout(90)
@pytest.mark.parametrize("start_method, how", [("fork", "sigkill"), ("spawn", "os_exit")])
def test_dht_and_averager_processes_end_when_their_creator_dies(tmp_path, start_method, how):
    children = _die_and_list_children(tmp_path, "averager", start_method, how)
    assert len(children) >= 3, children  # the DHT and averager processes and the DHT's p2pd (at least)
    assert still_running(children, timeout=10) == []


@pytest.mark.timeout(90)
def test_server_handler_processes_end_when_their_creator_is_killed(tmp_path):
    # each handler process held a copy of the other's command pipe (both are created before either is forked), so
    # neither saw EOF when the server's process was killed; and since they held copies of the DHT's pipe too, the DHT
    # process and its p2pd kept running as well
    children = _die_and_list_children(tmp_path, "server", "fork", "sigkill")
    assert len(children) == 4, children  # the DHT process, its p2pd, two connection handler processes
    assert still_running(children, timeout=10) == []


@pytest.mark.timeout(90)
@pytest.mark.parametrize("what", ["two_dhts", "two_averagers"])
def test_processes_created_before_either_started_end_when_their_creator_is_killed(tmp_path, what):
    # created first and started later, each forked child held a copy of the other's pipe to the creator: neither saw
    # EOF when the creator was killed, and both (with their p2pd) ran on forever
    children = _die_and_list_children(tmp_path, what, "fork", "sigkill")
    assert len(children) >= 4, children
    assert still_running(children, timeout=10) == []
