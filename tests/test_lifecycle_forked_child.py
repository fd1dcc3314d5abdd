"""A child made with a plain os.fork() (no multiprocessing) that ends with a normal interpreter exit does not touch
the DHT and averager processes of its parent."""

import subprocess
import sys

import pytest

SCRIPT = """
import os
import sys

import torch

import hivemind

dht = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
averager = hivemind.DecentralizedAverager([torch.zeros(3)], dht, prefix="forked", start=True, target_group_size=2)
pid = os.fork()
if pid == 0:
    sys.exit(0)  # e.g. a worker of a library that forks without exec: atexit hooks run in it
os.waitpid(pid, 0)
assert dht.store("key", "value", hivemind.get_dht_time() + 30)
print("value", dht.get("key", latest=True).value, "group bits", repr(averager.get_group_bits()), flush=True)
averager.shutdown()
dht.shutdown()
"""


@pytest.mark.timeout(60)
def test_plain_forked_child_exiting_normally_leaves_parents_processes_running(tmp_path):
    # multiprocessing's exit hook in the forked child saw the parent's DHT and averager as its own daemonic children:
    # it sent them SIGTERM (they stopped, the parent's calls failed) and printed "can only join a child process"
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=50, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "value value group bits ''"
    assert "Exception ignored" not in result.stderr and "Traceback" not in result.stderr, result.stderr[-3000:]
