"""Decentralized averaging end to end: N peers on this machine run R rounds of DecentralizedAverager.step().

    python benchmarks/benchmark_averaging.py --peers 16 --target_group_size 4 --rounds 5
    python benchmarks/benchmark_averaging.py --peers 4 --rounds 1000 --tensor_size 1000 --rss_every 100
    python benchmarks/benchmark_averaging.py --peers 4 --target_group_size 4 --rounds 1000 --abort_every 10

Every peer has its own DHT node and averager (each a background process). In each round all peers call
``step(wait=False)`` at once and the script waits for all of them. A peer's round counts as a success when step()
returned a group, and as correct when its tensors then equal the mean of its group members' tensors from before
the round. A step that has not finished ``--hang_grace`` seconds after its deadline counts as hung. The resident
memory of the averager processes (and of the DHTs' p2pd daemons) is printed every ``--rss_every`` rounds.

With ``--abort_every K``, every K-th round has a failure: one peer (a different one each time) joins its group and
then cancels its step before the all-reduce, so the others in its group are left waiting for its parts and for its
averages and must exclude it. Their step still succeeds; it counts as correct when every element of their tensors
is either the mean of the members that remained or their own value (parts the aborted peer was to average). The
aborted peer's tensors must be left as they were.

Only the public API is used, so ``benchmarks/compare.py`` runs it under the original hivemind too.
"""

import argparse
import json
import statistics
import threading
import time
from typing import Dict, List, Optional

import psutil
import torch

import hivemind
from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.control import AveragingStage

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
    parser.add_argument("--abort_every", type=int, default=0, help="every this many rounds a peer aborts mid-round")
    parser.add_argument("--sender_timeout", type=float, default=None, help="seconds (default: the library's)")
    parser.add_argument("--reducer_timeout", type=float, default=None, help="seconds (default: the library's)")
    parser.add_argument(
        "--download_state", action="store_true", help="after the rounds, time load_state_from_peers by a newcomer"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="also print the figures as one JSON line at the end")
    return parser.parse_args()


def rss_report(averagers: List[DecentralizedAverager], dhts: List[hivemind.DHT]) -> str:
    """Mean and max RSS of the averager processes and of the p2pd daemons they use (the DHTs'), in MiB; with up to
    8 peers also each peer's pair."""
    averager_rss = [_rss(getattr(averager, "pid", None)) for averager in averagers]
    daemon_rss = []
    for dht in dhts:
        try:
            children = psutil.Process(dht.pid).children(recursive=True)
        except psutil.Error:
            children = []
        daemons = [_rss(child.pid) for child in children if _name(child) == "p2pd"]
        daemon_rss.append(sum(rss for rss in daemons if rss is not None) if daemons else None)
    averagers_known, daemons_known = _known(averager_rss), _known(daemon_rss)
    report = (
        f"averager RSS mean {_mean(averagers_known) / MIB:.1f} MiB max {max(averagers_known, default=0) / MIB:.1f} MiB"
        f", p2pd RSS mean {_mean(daemons_known) / MIB:.1f} MiB max {max(daemons_known, default=0) / MIB:.1f} MiB"
    )
    if len(averagers) <= 8:
        pairs = [f"{_mib(a)}/{_mib(d)}" for a, d in zip(averager_rss, daemon_rss)]
        report += f"; per peer averager/p2pd MiB: {' '.join(pairs)}"
    return report


def _known(values: List[Optional[int]]) -> List[int]:
    return [value for value in values if value is not None]


def _mib(value: Optional[int]) -> str:
    return "?" if value is None else f"{value / MIB:.1f}"


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


class TensorsLocked(Exception):
    """An averager kept its tensors locked (e.g. it is still stuck in an earlier round's all-reduce)."""


def snapshot(averager: DecentralizedAverager, timeout: float) -> List[torch.Tensor]:
    """A copy of the averager's tensors; raises TensorsLocked if its lock is not free within ``timeout`` seconds."""
    copies: List[torch.Tensor] = []

    def copy() -> None:
        with averager.get_tensors() as tensors:
            copies.extend(tensor.clone() for tensor in tensors)

    thread = threading.Thread(target=copy, daemon=True)  # get_tensors() waits for the lock without a timeout
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TensorsLocked(f"its tensors stayed locked for {timeout:.0f} s")
    return copies


def snapshot_or_none(averager: DecentralizedAverager, timeout: float) -> Optional[List[torch.Tensor]]:
    try:
        return snapshot(averager, timeout)
    except TensorsLocked:
        return None


def abort_after_joining(control, deadline: float) -> bool:
    """Wait until the step found its group and waits for its trigger, then cancel it; False if it never got there."""
    while control.stage != AveragingStage.AWAITING_TRIGGER and not control.done() and time.monotonic() < deadline:
        time.sleep(0.01)
    joined = control.stage == AveragingStage.AWAITING_TRIGGER
    control.cancel()
    return joined


def averaged_without(after, before, members, index, excluded) -> bool:
    """Each element is the mean over the members other than ``excluded``, or this peer's own value."""
    remaining = [member for member in members if member != excluded]
    for i, tensor in enumerate(after):
        mean = torch.stack([before[member][i] for member in remaining]).mean(0)
        matches = torch.isclose(tensor, mean, atol=1e-5) | torch.isclose(tensor, before[index][i], atol=1e-5)
        if not bool(matches.all()):
            return False
    return True


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
    timeouts = {
        name: getattr(args, name) for name in ("sender_timeout", "reducer_timeout") if getattr(args, name) is not None
    }
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
            **timeouts,
        )
        for dht in dhts
    ]
    print(f"started {args.peers} peers in {time.perf_counter() - started:.1f} s")
    print(f"memory before round 1: {rss_report(averagers, dhts)}")

    successes = correct = hung = failed = 0
    aborted = aborted_intact = failed_rounds = 0
    round_times: List[float] = []
    group_sizes: List[int] = []
    try:
        for round_index in range(1, args.rounds + 1):
            try:
                before = [snapshot(averager, args.hang_grace) for averager in averagers]
            except TensorsLocked as e:
                print(f"stopped before round {round_index}: an averager is stuck, {e}")
                break
            round_started = time.perf_counter()
            aborting = None
            if args.abort_every > 0 and round_index % args.abort_every == 0:
                aborting = (round_index // args.abort_every - 1) % args.peers
            controls = [
                averager.step(
                    gather=index, wait=False, timeout=args.round_timeout, require_trigger=index == aborting
                )  # fmt: skip
                for index, averager in enumerate(averagers)
            ]
            deadline = time.monotonic() + args.round_timeout + args.hang_grace
            results: Dict[int, dict] = {}
            if aborting is not None:
                aborted += 1
                failed_rounds += abort_after_joining(controls[aborting], time.monotonic() + args.round_timeout)
            for index, control in enumerate(controls):
                if index == aborting:
                    continue
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
            if aborting is not None:
                after = snapshot_or_none(averagers[aborting], args.hang_grace)
                aborted_intact += after is not None and all(torch.equal(a, b) for a, b in zip(after, before[aborting]))
            for index, gathered in results.items():
                successes += 1
                members = sorted(gathered.values())
                groups.add(tuple(members))
                after = snapshot_or_none(averagers[index], args.hang_grace)
                if after is None:
                    print(f"  peer {index}: {args.hang_grace:.0f} s after its step returned, its tensors are locked")
                    continue
                if aborting in members:
                    correct += averaged_without(after, before, members, index, aborting)
                    continue
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
                    f"rounds up to {round_index:5d}: {successes}/{args.peers * round_index - aborted} steps succeeded"
                    f", {failed_rounds} rounds with a peer aborting mid-round, median round "
                    f"{statistics.median(recent):.2f} s"
                )
            if round_index % args.rss_every == 0 and round_index != args.rounds:
                print(f"memory after round {round_index}: {rss_report(averagers, dhts)}")
        print(f"memory after round {len(round_times)}: {rss_report(averagers, dhts)}")
        if args.download_state:
            download_state(args, initial_peers)
    finally:
        for averager in averagers:
            averager.shutdown()
        for dht in dhts:
            dht.shutdown()

    attempts = args.peers * len(round_times) - aborted  # aborted steps are not attempts
    figures = {
        "success_rate": successes / max(attempts, 1),
        "successes": successes,
        "attempts": attempts,
        "correct_averages": correct,
        "failed_steps": failed,
        "hung_steps": hung,
        "aborted_steps": aborted,
        "rounds_with_a_peer_aborting_mid_round": failed_rounds,
        "aborted_peers_left_intact": aborted_intact,
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
    if args.abort_every > 0:
        print(f"| steps aborted mid-round (after joining a group) | {failed_rounds}/{aborted} |")
        print(f"| aborted peers' tensors left as they were | {aborted_intact}/{aborted} |")
    print(f"| mean group size | {figures['mean_group_size']:.2f} |")
    print(f"| time per round, median | {figures['median_round_s']:.2f} s |")
    print(f"| time per round, max | {figures['max_round_s']:.2f} s |")
    if args.json:
        print(json.dumps(figures))


if __name__ == "__main__":
    main()
