"""hivemind-dht whose DHT process dies right after it started says so and exits 1, without a traceback."""

import os
import subprocess
import sys

import pytest

KILL_BEFORE_THE_ADDRESSES = """
import os, signal, sys
from hivemind.dht import DHT
from hivemind.hivemind_cli import run_dht

read_addresses = DHT.get_visible_maddrs

def killed_first(self, *args, **kwargs):  # the DHT process dies just as the command reads its addresses
    os.kill(self.pid, signal.SIGKILL)
    self.join()
    return read_addresses(self, *args, **kwargs)

DHT.get_visible_maddrs = killed_first
sys.exit(run_dht.main(sys.argv[1:]))
"""


@pytest.mark.timeout(120)
def test_a_dht_process_killed_before_the_addresses_are_read_is_reported_without_a_traceback():
    env = dict(os.environ, HIVEMIND_COLORS="0")
    result = subprocess.run(
        [sys.executable, "-c", KILL_BEFORE_THE_ADDRESSES, "--host_maddrs", "/ip4/127.0.0.1/tcp/0"],
        capture_output=True, text=True, env=env, timeout=100,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if "[ERROR]" in line]
    assert len(errors) == 1 and "DHT process" in errors[0] and "SIGKILL" in errors[0], result.stderr
    assert errors[0].endswith("exiting. Start hivemind-dht again"), errors[0]
