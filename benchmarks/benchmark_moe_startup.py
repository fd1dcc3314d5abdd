"""Expert server start-up: repeated create / serve / shutdown cycles, timed, with checks for leftovers.

    python benchmarks/benchmark_moe_startup.py --cycles 50              # Server.create in this process
    python benchmarks/benchmark_moe_startup.py --cli --cycles 20        # hivemind-server subprocesses, Ctrl-C

Each cycle starts a server with a few experts, makes one remote forward call to it from a client DHT, and shuts it
down. A cycle fails if any step raises or takes over --cycle_timeout seconds, or (library mode) if a socket file of
that server's DHT, p2p daemon or connection handler is still there after shutdown. After all cycles the script checks
that no child process was left behind. (Other programs on the machine create and leave files in the temporary
directory too, so only the server's own files are checked.) Prints one table. Its "start 1st" is the first cycle's
start-up: in library mode the only one that pays for torch's first-use work (the imports of its optimizers, the
first matrix product), as a fresh hivemind-server does.

    python benchmarks/benchmark_moe_startup.py --cycles 20 --experts 4 --hidden_dim 1024   # the MoE issue's setting
"""

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from typing import List

import psutil
import torch

from hivemind.dht import DHT
from hivemind.moe.server import Server
from hivemind.moe.server.connection_handler import _daemon_listen_maddr
from hivemind.moe.server.dht_handler import get_experts


def socket_files_of(server: Server) -> List[str]:
    """Socket files of the server's DHT, its p2p daemon (and the DHT's client) and its connection handlers."""
    daemon_socket = server.dht.run_coroutine(_daemon_listen_maddr).replace("/unix", "", 1)
    client_socket = daemon_socket.replace("hivemind-p2pd-", "hivemind-p2pclient-")
    handler_sockets = [str(h._p2p._client_listen_maddr).replace("/unix", "", 1) for h in server.conn_handlers]
    return [server.dht._socket_address, daemon_socket, client_socket, *handler_sockets]


def live_children() -> List[psutil.Process]:
    children = []
    for child in psutil.Process().children(recursive=True):
        try:
            if child.status() != psutil.STATUS_ZOMBIE:
                children.append(child)
        except psutil.NoSuchProcess:
            pass
    return children


def find_expert(client_dht: DHT, uid: str, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        (expert,) = get_experts(client_dht, [uid])
        if expert is not None:
            return expert
        time.sleep(0.05)
    raise TimeoutError(f"{uid} was not announced within {timeout} s")


def library_cycle(args) -> dict:
    started = time.perf_counter()
    server = Server.create(
        num_experts=args.experts, expert_cls="ffn", hidden_dim=args.hidden_dim, device="cpu", start=True,
        host_maddrs=["/ip4/127.0.0.1/tcp/0"],
    )  # fmt: skip
    ready = time.perf_counter()
    socket_files = socket_files_of(server)
    client_dht = DHT(initial_peers=server.dht.get_visible_maddrs(), start=True)
    try:
        uid = next(iter(server.module_backends))
        expert = find_expert(client_dht, uid, args.cycle_timeout)
        output = expert(torch.randn(2, args.hidden_dim))
        assert output.shape == (2, args.hidden_dim)
        served = time.perf_counter()
    finally:
        client_dht.shutdown()
        stopping = time.perf_counter()
        server.shutdown()
    stopped = time.perf_counter()
    leftover = [path for path in socket_files if os.path.exists(path)]
    if leftover:
        raise RuntimeError(f"files left after shutdown: {leftover}")
    return dict(start=ready - started, first_call=served - ready, shutdown=stopped - stopping)


def cli_cycle(args) -> dict:
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "hivemind.hivemind_cli.run_server", "--num_experts", str(args.experts),
         "--hidden_dim", str(args.hidden_dim), "--device", "cpu", "--host_maddrs", "/ip4/127.0.0.1/tcp/0"],
        stderr=subprocess.PIPE, text=True, env=dict(os.environ, HIVEMIND_COLORS="0"),
    )  # fmt: skip
    try:
        deadline = time.monotonic() + args.cycle_timeout
        for line in process.stderr:
            if re.search(r"Server started with \d+ modules", line):
                break
            if time.monotonic() > deadline:
                raise TimeoutError("hivemind-server did not start in time")
        else:
            raise RuntimeError(f"hivemind-server exited with {process.wait()} before it started")
        ready = time.perf_counter()
        process.send_signal(signal.SIGINT)
        process.stderr.read()
        exit_code = process.wait(timeout=args.cycle_timeout)
        if exit_code != 0:
            raise RuntimeError(f"hivemind-server exited with {exit_code} after Ctrl-C")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return dict(start=ready - started, first_call=0.0, shutdown=time.perf_counter() - ready)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=50)
    parser.add_argument("--experts", type=int, default=2)
    parser.add_argument("--hidden_dim", type=int, default=64)
    parser.add_argument("--cycle_timeout", type=float, default=30.0)
    parser.add_argument("--cli", action="store_true", help="cycle hivemind-server subprocesses instead")
    args = parser.parse_args()

    cycle = cli_cycle if args.cli else library_cycle
    timings, failures = [], []
    for index in range(args.cycles):
        try:
            timings.append(cycle(args))
        except Exception as e:
            failures.append(f"cycle {index}: {e!r}")
    leftover_processes = live_children()

    header = f"{'mode':<10}{'cycles':>8}{'failed':>8}{'start 1st':>11}{'start med':>11}{'start max':>11}"
    print(f"{header}{'call med':>10}{'stop med':>10}")
    column = lambda key, fn: fn([t[key] for t in timings]) if timings else float("nan")
    first = timings[0]["start"] if timings else float("nan")  # library mode: includes torch's first-use imports
    print(
        f"{'cli' if args.cli else 'library':<10}{args.cycles:>8}{len(failures):>8}{first:>10.3f}s"
        f"{column('start', statistics.median):>10.3f}s{column('start', max):>10.3f}s"
        f"{column('first_call', statistics.median):>9.3f}s{column('shutdown', statistics.median):>9.3f}s"
    )
    print(f"experts per server: {args.experts}, hidden_dim: {args.hidden_dim}")
    print(f"leftover child processes: {[p.pid for p in leftover_processes]}")
    for failure in failures:
        print(failure)
    return 1 if failures or leftover_processes else 0


if __name__ == "__main__":
    sys.exit(main())
