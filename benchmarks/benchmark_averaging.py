"""Decentralized averaging end to end: N peers on this machine run R rounds of DecentralizedAverager.step().

    python benchmarks/benchmark_averaging.py --peers 16 --target_group_size 4 --rounds 5
    python benchmarks/benchmark_averaging.py --peers 4 --rounds 1000 --tensor_size 1000 --rss_every 100

Every peer has its own DHT node and averager (each a background process). In each round all peers call
``step(wait=False)`` at once and the script waits for all of them. A peer's round counts as a success when step()
returned a group, and as correct when its tensors then equal the mean of its group members' tensors from before
the round. A step that has not finished ``--hang_grace`` seconds after its deadline counts as hung. The resident
memory of the averager processes (and of the DHTs' p2pd daemons) is printed every ``--rss_every`` rounds.

Only the public API is used, so ``benchmarks/compare.py`` runs it under the original hivemind too.
"""

import argparse
import json
import statistics
import time
from typing import Dict, List, Optional

import psutil
import torch

import hivemind
from hivemind.averaging import DecentralizedAverager

MIB = 2**20


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", type=int, default=16, help="number of averagers (each with its own DHT node)")
    parser.add_argument("--target_group_size", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--num_tensors", type=int, default=2, help="tensors averaged by each peer")
    parser.add_argument("--tensor_size", type=int, default=100_000, help="float32 elements per tensor")
    parser.add_argument("--min_matchmaking_time", type=float, default=2.0, help="seconds")
    parser.add_argument("--request_timeout", type=float, default=1.0, help="seconds")
    parser.add_argument("--round_timeout", type=float, default=30.0, help="step(timeout=...) in seconds")
    parser.add_argument("--hang_grace", type=float, default=30.0, help="seconds past the deadline = hung")
    parser.add_argument("--rss_every", type=int, default=100, help="print memory every this many rounds")
    parser.add_argument(
        "--download_state", action="store_true", help="after the rounds, time load_state_from_peers by a newcomer"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="also print the figures as one JSON line at the end")
    return parser.parse_args()


def rss_report(averagers: List[DecentralizedAverager], dhts: List[hivemind.DHT]) -> str:
    averager_rss = [_rss(getattr(averager, "pid", None)) for averager in averagers]
    daemon_rss = []
    for dht in dhts:
        try:
            children = psutil.Process(dht.pid).children(recursive=True)
        except psutil.Error:
            continue
        daemon_rss.extend(_rss(child.pid) for child in children if _name(child) == "p2pd")
    averager_rss = [rss for rss in averager_rss if rss is not None]
    daemon_rss = [rss for rss in daemon_rss if rss is not None]
    return (
        f"averager RSS mean {_mean(averager_rss) / MIB:.1f} MiB max {max(averager_rss, default=0) / MIB:.1f} MiB, "
        f"p2pd RSS mean {_mean(daemon_rss) / MIB:.1f} MiB max {max(daemon_rss, default=0) / MIB:.1f} MiB"
    )


def _rss(pid: Optional[int]) -> Optional[int]:
    try:
        return psutil.Process(pid).memory_info().rss if pid is not None else None
    except psutil.Error:
        return None


def _name(process: psutil.Process) -> str:
    try:
        return process.name()
    except psutil.Error:
        return ""


def _mean(values: List[float]) -> float:
    return statistics.fmean(values) if values else 0.0


def snapshot(averager: DecentralizedAverager) -> List[torch.Tensor]:
    with averager.get_tensors() as tensors:
        return [tensor.clone() for tensor in tensors]


def download_state(args: argparse.Namespace, initial_peers: List[str]) -> None:
    """A newcomer with the same tensor shapes downloads the state of one of the peers."""
    dht = hivemind.DHT(initial_peers=initial_peers, start=True)  # (the original's DHT is no context manager)
    newcomer = DecentralizedAverager(
        [torch.zeros(args.tensor_size) for _ in range(args.num_tensors)],
        dht,
        start=True,
        prefix="benchmark_averaging",
        allow_state_sharing=False,
    )
    try:
        mebibytes = args.num_tensors * args.tensor_size * 4 / MIB
        started = time.perf_counter()
        result = newcomer.load_state_from_peers(timeout=args.round_timeout * 10)
        elapsed = time.perf_counter() - started
        if result is None:
            print("state download: no donor answered")
        else:
            print(f"state download: {mebibytes:.1f} MiB in {elapsed:.2f} s ({mebibytes / elapsed:.1f} MiB/s)")
    finally:
        newcomer.shutdown()
        dht.shutdown()


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    print(
        f"peers {args.peers}, target group size {args.target_group_size}, rounds {args.rounds}, "
        f"tensors {args.num_tensors} x {args.tensor_size} float32"
    )
    started = time.perf_counter()
    dhts = [hivemind.DHT(start=True)]
    initial_peers = [str(addr) for addr in dhts[0].get_visible_maddrs()]
    dhts += [hivemind.DHT(initial_peers=initial_peers, start=True) for _ in range(args.peers - 1)]
    averagers = [
        DecentralizedAverager(
            [torch.randn(args.tensor_size) for _ in range(args.num_tensors)],
            dht,
            start=True,
            prefix="benchmark_averaging",
            target_group_size=args.target_group_size,
            min_matchmaking_time=args.min_matchmaking_time,
            request_timeout=args.request_timeout,
        )
        for dht in dhts
    ]
    print(f"started {args.peers} peers in {time.perf_counter() - started:.1f} s")
    print(f"memory before round 1: {rss_report(averagers, dhts)}")

    successes = correct = hung = failed = 0
    round_times: List[float] = []
    group_sizes: List[int] = []
    try:
        for round_index in range(1, args.rounds + 1):
            before = [snapshot(averager) for averager in averagers]
            round_started = time.perf_counter()
            controls = [
                averager.step(gather=index, wait=False, timeout=args.round_timeout)
                for index, averager in enumerate(averagers)
            ]
            deadline = time.monotonic() + args.round_timeout + args.hang_grace
            results: Dict[int, dict] = {}
            for index, control in enumerate(controls):
                try:
                    results[index] = control.result(timeout=max(deadline - time.monotonic(), 0.0))
                except TimeoutError:
                    hung += 1
                    control.cancel()
                except Exception as e:
                    failed += 1
                    print(f"  peer {index}: step failed: {type(e).__name__}: {e}")
            round_times.append(time.perf_counter() - round_started)
            groups = set()
            for index, gathered in results.items():
                successes += 1
                members = sorted(gathered.values())
                groups.add(tuple(members))
                after = snapshot(averagers[index])
                expected = [torch.stack([before[m][i] for m in members]).mean(0) for i in range(args.num_tensors)]
                if all(torch.allclose(a, e, atol=1e-5) for a, e in zip(after, expected)):
                    correct += 1
            group_sizes.extend(len(group) for group in groups)
            if args.rounds <= 50:  # longer runs print a summary line every --rss_every rounds instead
                print(
                    f"round {round_index:4d}: {len(results)}/{args.peers} peers averaged in {len(groups)} groups, "
                    f"{round_times[-1]:.2f} s"
                )
            elif round_index % args.rss_every == 0 or round_index == args.rounds:
                recent = round_times[-args.rss_every :]
                print(
                    f"rounds up to {round_index:5d}: {successes}/{args.peers * round_index} steps succeeded, "
                    f"median round {statistics.median(recent):.2f} s"
                )
            if round_index % args.rss_every == 0 and round_index != args.rounds:
                print(f"memory after round {round_index}: {rss_report(averagers, dhts)}")
        print(f"memory after round {args.rounds}: {rss_report(averagers, dhts)}")
        if args.download_state:
            download_state(args, initial_peers)
    finally:
        for averager in averagers:
            averager.shutdown()
        for dht in dhts:
            dht.shutdown()

    attempts = args.peers * args.rounds
    figures = {
        "success_rate": successes / attempts,
        "successes": successes,
        "attempts": attempts,
        "correct_averages": correct,
        "failed_steps": failed,
        "hung_steps": hung,
        "mean_group_size": _mean(group_sizes),
        "median_round_s": statistics.median(round_times),
        "max_round_s": max(round_times),
    }
    print("| figure | value |")
    print("|---|---|")
    print(f"| success rate | {100 * figures['success_rate']:.1f} % ({successes}/{attempts}) |")
    print(f"| correct averages | {correct}/{attempts} |")
    print(f"| failed steps | {failed} |")
    print(f"| hung steps | {hung} |")
    print(f"| mean group size | {figures['mean_group_size']:.2f} |")
    print(f"| time per round, median | {figures['median_round_s']:.2f} s |")
    print(f"| time per round, max | {figures['max_round_s']:.2f} s |")
    if args.json:
        print(json.dumps(figures))


if __name__ == "__main__":
    main()
