"""Running a command-line tool whose DHT process is SIGKILLed just as the command reads the DHT's addresses."""

import os
import subprocess
import sys
from typing import Sequence

KILL_ON_ADDRESS_READ = """
import importlib, os, signal, sys
from hivemind.dht import DHT

command = importlib.import_module(sys.argv[1])
read_addresses = DHT.get_visible_maddrs

def killed_first(self, *args, **kwargs):  # the DHT process dies just as the command reads its addresses
    if sys._getframe(1).f_globals["__name__"] == command.__name__:  # (not a read inside the library)
        os.kill(self.pid, signal.SIGKILL)
        self.join()
    return read_addresses(self, *args, **kwargs)

DHT.get_visible_maddrs = killed_first
sys.exit(command.main(sys.argv[2:]))
"""


def run_with_dht_killed_on_address_read(command_module: str, args: Sequence[str], timeout: float):
    """Run ``command_module.main(args)`` in a subprocess (stderr captured as text) with that fault injected."""
    env = dict(os.environ, HIVEMIND_COLORS="0")
    return subprocess.run(
        [sys.executable, "-c", KILL_ON_ADDRESS_READ, command_module, *args],
        capture_output=True, text=True, env=env, timeout=timeout,
    )  # fmt: skip
