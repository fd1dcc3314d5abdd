"""
DHT benchmark through the public API only (``hivemind.DHT``, ``get``, ``store``), so that the same script runs against
any hivemind implementation.

Swarm mode: start ``--peers`` peers in the background, then store ``--keys`` random keys through random peers and read
each back through another random peer, from ``--workers`` concurrent threads. Pair mode: two peers, sequential
store/get latency through the DHT process API, ``DHT(start=True)`` ready time in a warm process, and the memory of a
DHT process plus its p2pd daemon.

    python benchmarks/benchmark_dht.py --peers 16 --keys 1280 --workers 10
"""

import argparse
import random
import statistics
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Dict, List, Sequence, Tuple

import hivemind


def percentiles(latencies: Sequence[float]) -> Dict[str, float]:
    ordered = sorted(latencies)
    if not ordered:
        return {"p50": float("nan"), "p90": float("nan"), "p99": float("nan"), "max": float("nan")}

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {"p50": at(0.5), "p90": at(0.9), "p99": at(0.99), "max": ordered[-1]}


def print_table(title: str, rows: List[Tuple[str, str]]) -> None:
    width = max(len(name) for name, _ in rows)
    print(f"\n{title}")
    print("-" * (width + 24))
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    sys.stdout.flush()


def start_swarm(num_peers: int, **kwargs) -> List["hivemind.DHT"]:
    first = hivemind.DHT(start=True, **kwargs)
    initial_peers = [str(maddr) for maddr in first.get_visible_maddrs()]
    others = [
        hivemind.DHT(initial_peers=initial_peers, start=True, await_ready=False, **kwargs)
        for _ in range(num_peers - 1)
    ]
    for peer in others:
        peer.wait_until_ready()
    return [first] + others


def run_concurrently(
    tasks: List[Callable[[], Tuple[bool, float]]], workers: int
) -> Tuple[List[bool], List[float], float]:
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        outcomes = list(pool.map(lambda task: task(), tasks))
    elapsed = time.perf_counter() - started
    return [ok for ok, _ in outcomes], [latency for _, latency in outcomes], elapsed


def timed(call: Callable[[], bool]) -> Tuple[bool, float]:
    started = time.perf_counter()
    try:
        ok = bool(call())
    except Exception as e:
        print(f"call failed: {e!r}", file=sys.stderr)
        ok = False
    return ok, time.perf_counter() - started


def benchmark_swarm(args: argparse.Namespace) -> None:
    run_started = time.perf_counter()
    peers = start_swarm(args.peers)
    startup_time = time.perf_counter() - run_started
    rng = random.Random(args.seed)
    keys = [f"benchmark_{uuid.UUID(int=rng.getrandbits(128)).hex}" for _ in range(args.keys)]
    values = {key: rng.randrange(2**31) for key in keys}
    expiration = time.time() + args.expiration

    def store_task(key: str, peer) -> Callable[[], Tuple[bool, float]]:
        return lambda: timed(lambda: peer.store(key, values[key], expiration_time=expiration))

    def get_task(key: str, peer) -> Callable[[], Tuple[bool, float]]:
        def get_and_check():
            found = peer.get(key, latest=False)
            return found is not None and found.value == values[key]

        return lambda: timed(get_and_check)

    try:
        storers = {key: rng.randrange(len(peers)) for key in keys}
        store_ok, store_latencies, store_time = run_concurrently(
            [store_task(key, peers[storers[key]]) for key in keys], args.workers
        )
        readers = [rng.choice([i for i in range(len(peers)) if i != storers[key]] or [0]) for key in keys]
        get_ok, get_latencies, get_time = run_concurrently(
            [get_task(key, peers[reader]) for key, reader in zip(keys, readers)], args.workers
        )
    finally:
        shutdown_started = time.perf_counter()
        for peer in peers:
            peer.shutdown()
        shutdown_time = time.perf_counter() - shutdown_started
    total_time = time.perf_counter() - run_started

    store_pct, get_pct = percentiles(store_latencies), percentiles(get_latencies)
    print_table(
        f"DHT swarm: {args.peers} peers, {args.keys} stores + {args.keys} gets, {args.workers} workers "
        f"(hivemind {hivemind.__version__})",
        [
            ("swarm start-up", f"{startup_time:.2f} s"),
            ("store success", f"{100 * sum(store_ok) / len(store_ok):.1f} %"),
            ("get success", f"{100 * sum(get_ok) / len(get_ok):.1f} %"),
            ("store throughput", f"{len(store_ok) / store_time:.1f} ops/s ({store_time:.2f} s)"),
            ("get throughput", f"{len(get_ok) / get_time:.1f} ops/s ({get_time:.2f} s)"),
            ("store latency mean", f"{1000 * statistics.mean(store_latencies):.1f} ms"),
            ("store latency p50/p90/p99/max", " / ".join(f"{1000 * v:.1f}" for v in store_pct.values()) + " ms"),
            ("get latency mean", f"{1000 * statistics.mean(get_latencies):.1f} ms"),
            ("get latency p50/p90/p99/max", " / ".join(f"{1000 * v:.1f}" for v in get_pct.values()) + " ms"),
            ("shutdown", f"{shutdown_time:.2f} s"),
            ("whole run", f"{total_time:.2f} s"),
        ],
    )


def process_tree_rss_mib(pid: int) -> Tuple[float, float]:
    """(RSS, USS) in MiB of a process and all its descendants; (nan, nan) without psutil."""
    try:
        import psutil
    except ImportError:
        return float("nan"), float("nan")
    root = psutil.Process(pid)
    rss = uss = 0
    for process in [root] + root.children(recursive=True):
        info = process.memory_full_info()
        rss, uss = rss + info.rss, uss + info.uss
    return rss / 2**20, uss / 2**20


def benchmark_pair(args: argparse.Namespace) -> None:
    first = hivemind.DHT(start=True)
    second = hivemind.DHT(initial_peers=[str(maddr) for maddr in first.get_visible_maddrs()], start=True)
    try:
        expiration = time.time() + args.expiration
        keys = [f"pair_{i}_{uuid.uuid4().hex}" for i in range(args.pair_ops)]
        store_latencies, local_get_latencies, remote_get_latencies = [], [], []
        for i, key in enumerate(keys):
            ok, latency = timed(lambda key=key, i=i: first.store(key, i, expiration_time=expiration))
            assert ok, f"store of {key} failed"
            store_latencies.append(latency)
        for i, key in enumerate(keys):
            ok, latency = timed(lambda key=key, i=i: first.get(key).value == i)
            assert ok, f"get of {key} failed"
            local_get_latencies.append(latency)
        for i, key in enumerate(keys):
            ok, latency = timed(lambda key=key, i=i: second.get(key).value == i)
            assert ok, f"get of {key} through the second peer failed"
            remote_get_latencies.append(latency)
        rss, uss = process_tree_rss_mib(first.pid)
    finally:
        second.shutdown()
        first.shutdown()

    ready_times = []
    for _ in range(args.ready_trials):
        started = time.perf_counter()
        dht = hivemind.DHT(start=True)
        ready_times.append(time.perf_counter() - started)
        dht.shutdown()

    print_table(
        f"DHT pair: 2 peers, {args.pair_ops} sequential ops each (hivemind {hivemind.__version__})",
        [
            (
                "store p50 / p90",
                f"{1000 * percentiles(store_latencies)['p50']:.2f} / "
                f"{1000 * percentiles(store_latencies)['p90']:.2f} ms",
            ),
            (
                "get (same peer) p50 / p90",
                f"{1000 * percentiles(local_get_latencies)['p50']:.2f} / "
                f"{1000 * percentiles(local_get_latencies)['p90']:.2f} ms",
            ),
            (
                "get (other peer) p50 / p90",
                f"{1000 * percentiles(remote_get_latencies)['p50']:.2f} / "
                f"{1000 * percentiles(remote_get_latencies)['p90']:.2f} ms",
            ),
            ("DHT(start=True) ready, warm, median", f"{1000 * statistics.median(ready_times):.0f} ms"),
            ("DHT process + p2pd RSS", f"{rss:.0f} MiB (USS {uss:.0f} MiB)"),
        ],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["all", "swarm", "pair"], default="all")
    parser.add_argument("--peers", type=int, default=16, help="peers in the swarm")
    parser.add_argument("--keys", type=int, default=1280, help="keys stored and read back in the swarm")
    parser.add_argument("--workers", type=int, default=10, help="concurrent threads issuing calls")
    parser.add_argument("--expiration", type=float, default=300, help="lifetime of stored values, s")
    parser.add_argument("--pair_ops", type=int, default=200, help="sequential stores/gets in pair mode")
    parser.add_argument("--ready_trials", type=int, default=5, help="DHT(start=True) ready-time measurements")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    threading.current_thread().name = "benchmark"
    if args.mode in ("all", "swarm"):
        benchmark_swarm(args)
    if args.mode in ("all", "pair"):
        benchmark_pair(args)


if __name__ == "__main__":
    main()
