"""A MoE peer script (moe_peer.py, moe_mixture_peer.py) run in a subprocess of one implementation, read as JSON lines,
and the start of a server from it (retried for the original, whose Server now and then never gets ready)."""

import json
import queue
import subprocess
import threading
import time
from pathlib import Path

from .conftest import SIDE_IMPLEMENTATION
from .harness import HarnessError, _log_tail, _spawn, check_implementation, kill_tree, python_command


class MoEPeer:
    """``script`` in a subprocess of one implementation; `event()` waits for its next JSON line."""

    def __init__(self, script: Path, side: str, args, log_dir: Path):
        self.implementation = SIDE_IMPLEMENTATION[side]
        self.log_path = log_dir / f"{script.stem}-{side}-{args[0]}-{time.monotonic_ns()}.log"
        cmd = python_command(self.implementation) + [str(script), *map(str, args)]
        self.proc = _spawn(cmd, self.implementation, self.log_path, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.lines = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for raw in self.proc.stdout:
            try:
                self.lines.put(json.loads(raw))
            except ValueError:
                continue
        self.lines.put(None)

    def event(self, name: str, timeout: float = 60) -> dict:
        try:
            message = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise HarnessError(f"no {name!r} within {timeout} s; log:\n{_log_tail(self.log_path)}") from None
        if message is None or message.get("event") != name:
            raise HarnessError(f"expected {name!r}, got {message}; log:\n{_log_tail(self.log_path)}")
        check_implementation(self.implementation, message["version"], message["file"])
        return message

    def close(self, graceful: bool = True):
        """Ask the script to end (closing its stdin) and wait up to 15 s, then kill what is left; a peer that never
        got ready does not read its stdin, so ``graceful=False`` kills it at once."""
        try:
            self.proc.stdin.close()
            if graceful:
                self.proc.wait(timeout=15)
        except Exception:  # noqa: BLE001 - killed below in any case
            pass
        kill_tree(self.proc)


def start_server(script: Path, side: str, args, log_dir: Path, timeout: float = 30, original_attempts: int = 8):
    """(peer, maddrs) of a started server. The original's Server takes 3-15 s to start on a loaded machine and now
    and then never gets ready (its known bootstrap bug, upstream #634: its pools never start, and it does not recover),
    so its start is retried in a fresh process (8 x 30 s stays within the 300 s test limit; in a full suite run 5 of 5
    attempts of 45 s once failed so, while a start that works is ready within seconds); ours must start the first
    time."""
    attempts = original_attempts if SIDE_IMPLEMENTATION[side] == "original" else 1
    for attempt in range(attempts):
        server = MoEPeer(script, side, args, log_dir)
        try:
            return server, server.event("ready", timeout=timeout)["maddrs"]
        except HarnessError:
            server.close(graceful=False)  # (it never got ready: the attempts and kills stay within 300 s)
            if attempt == attempts - 1:
                raise
