"""Shutting down the DHT before the averager that uses its daemon is quiet: the averager has nothing left to undo."""

import subprocess
import sys

import pytest

SCRIPT = """
import torch

import hivemind

dht = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
averager = hivemind.DecentralizedAverager([torch.zeros(3)], dht, prefix="order", start=True, target_group_size=2)
dht.shutdown()  # its p2pd goes with it, and with the daemon the averager's handlers
averager.shutdown()
print("exit code", averager.exitcode)
"""


@pytest.mark.timeout(60)
def test_averager_shut_down_after_its_dht_exits_cleanly_without_warnings(tmp_path):
    # (in a script of its own: the averager process logs to the stderr it inherits, which pytest cannot capture)
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=50, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "exit code 0"
    assert "WARN" not in result.stderr and "ERROR" not in result.stderr, result.stderr
