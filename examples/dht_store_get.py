"""Two DHT peers on this machine: one stores a value and a dictionary entry, the other reads them back.

python examples/dht_store_get.py

Ctrl-C stops it at any point once hivemind is imported: both peers are shut down, then it prints "interrupted" (exit
code 130). During the first seconds, while Python imports hivemind and torch, it ends with a KeyboardInterrupt
traceback instead (nothing has started yet).
"""

import os
import signal
import sys

import hivemind
from hivemind.utils import get_dht_time


def main() -> None:
    with hivemind.DHT(start=True) as first:
        initial_peers = [str(addr) for addr in first.get_visible_maddrs()]
        print("first peer is reachable at", initial_peers)

        with hivemind.DHT(initial_peers=initial_peers, start=True) as second:
            expiration = get_dht_time() + 60
            assert second.store("greeting", "hello, swarm", expiration_time=expiration)
            assert second.store("scores", 0.93, expiration_time=expiration, subkey="alice")

            print("greeting ->", first.get("greeting"))
            value, latest_expiration = first.get("scores", latest=True)
            print("scores ->", {subkey: entry.value for subkey, entry in value.items()})


def interrupt_once(signal_number, frame) -> None:
    """Ctrl-C: stop what runs; further Ctrl-Cs are ignored, so that they cannot cut the peers' shutdown short."""
    if os.getpid() != SCRIPT_PID:  # a library process forked a moment ago, before it set its own handling
        return
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


SCRIPT_PID = os.getpid()

if __name__ == "__main__":
    signal.signal(signal.SIGINT, interrupt_once)
    try:
        main()
    except KeyboardInterrupt:
        print("interrupted", flush=True)
        sys.exit(130)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # finished: a late Ctrl-C must not break the interpreter's exit
