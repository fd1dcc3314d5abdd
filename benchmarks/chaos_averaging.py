"""Chaos test of decentralized averaging: peers average in small groups while a driver kills, freezes, replaces them.

    python benchmarks/chaos_averaging.py --peers 6 --duration 300
    python benchmarks/chaos_averaging.py --peers 4 --target_group_size 2 --vector_size 1000000 --duration 180

Each peer is a process of its own (started in a session of its own, with its DHT node, p2pd daemon and averager
process below it) that calls ``step(gather=..., weight=..., timeout=--step_timeout)`` in a loop. Before each step it
fills its vector with ``a + b * pattern`` (fresh random ``a``, ``b`` and weight ``w``, sent as its ``gather``), so a
member can rebuild the exact weighted mean of any subset of its group from the gathered dict that ``step`` returns.
Each element of a result must be the mean of some subset of the group that contains the peer itself (the full group
when nobody failed; without a member that died or froze mid-round; the peer's own value where that member was to
average): an element that matches no subset is a **wrong** average, and a result that leaves out a member the driver
never touched during the round is counted apart (**excluded live**). A step still unanswered ``--hang_slack`` seconds
after its timeout is a **hang**; a peer that reports no round for far longer is **stuck**.

The chaos driver acts every ``--chaos_every`` seconds (random, at least ``--min_untouched`` peers left alone):

- ``crash``: SIGKILL to the peer's whole process group (a machine that dies), a replacement after ``--restart_delay``;
- ``kill_main``: SIGKILL to the peer's main process only: its DHT, averager and p2pd must exit by themselves within
  ``--orphan_grace`` seconds (otherwise they are counted as **leaked** and killed);
- ``freeze``: SIGSTOP to its process group for 2..``--max_freeze`` seconds, then SIGCONT.

Half of the replacements restart with the dead peer's ``identity_path`` (same peer id), half with a new identity.
The last ``--calm`` seconds are free of chaos: every round that starts then, once all peers are up, must succeed
with the exact average of its whole group. The script prints a table of round outcomes, failure reasons, durations,
the RSS of each peer's averager process and p2pd over time, files left behind by killed peers (their p2pd sockets and
shared memory) and the most frequent warnings of the peers' logs.
"""

import argparse
import collections
import itertools
import os
import random
import signal
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Dict, List, Optional

from chaos_common import (
    close_all,
    drive,
    family,
    json_records,
    kill,
    make_emit,
    measure,
    normalize,
    print_memory_table,
    print_warnings,
    run_chaos,
    spawn,
    wait_for_eof,
)

PREFIX = "chaos"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", type=int, default=6)
    parser.add_argument("--target_group_size", type=int, default=3)
    parser.add_argument("--vector_size", type=int, default=2_000_000, help="float32 elements averaged by each peer")
    parser.add_argument("--duration", type=float, default=300, help="seconds of rounds in all, the calm tail included")
    parser.add_argument("--calm", type=float, default=45, help="seconds without chaos at the end")
    parser.add_argument("--chaos_every", type=float, default=12, help="mean seconds between two chaos actions")
    parser.add_argument("--actions", default="crash,kill_main,freeze", help="comma-separated chaos actions")
    parser.add_argument("--max_freeze", type=float, default=20, help="seconds")
    parser.add_argument("--restart_delay", type=float, default=3, help="seconds from a kill to its replacement")
    parser.add_argument("--min_untouched", type=int, default=2, help="peers the driver leaves running at any time")
    parser.add_argument("--min_matchmaking_time", type=float, default=2.0)
    parser.add_argument("--request_timeout", type=float, default=1.0)
    parser.add_argument("--step_timeout", type=float, default=30.0, help="step(timeout=...)")
    parser.add_argument("--hang_slack", type=float, default=15.0, help="seconds past the step timeout = hung")
    parser.add_argument("--orphan_grace", type=float, default=15.0, help="seconds for orphans to exit")
    parser.add_argument("--pause", type=float, default=0.3, help="seconds between a peer's rounds")
    parser.add_argument("--rss_every", type=float, default=5.0, help="seconds between memory samples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None, help="where peer logs and identities go (default: a temp dir)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--label", default="", help=argparse.SUPPRESS)
    parser.add_argument("--initial_peers", default="", help=argparse.SUPPRESS)
    parser.add_argument("--identity_path", default=None, help=argparse.SUPPRESS)
    return parser.parse_args()


# ---------------------------------------------------------------------------------------------------- the peers


def pattern_of(size: int):
    import torch

    return torch.linspace(-1.0, 1.0, size)


def check_result(result, gathered: dict, own: str, pattern) -> dict:
    """Which subset of the group each element was averaged over: {"subsets": {"a+b": count}, "unmatched": count}."""
    import torch

    members = sorted(gathered.values(), key=lambda info: info["label"])
    others = [info for info in members if info["label"] != own]
    mine = [info for info in members if info["label"] == own]
    remaining = torch.ones_like(result, dtype=torch.bool)
    counts = {}
    for size in range(len(others), -1, -1):  # the whole group first, the peer's own value last
        for subset in itertools.combinations(others, size):
            chosen = mine + list(subset)
            total = sum(info["w"] for info in chosen)
            a = sum(info["w"] * info["a"] for info in chosen) / total
            b = sum(info["w"] * info["b"] for info in chosen) / total
            close = torch.isclose(result, a + b * pattern, rtol=1e-4, atol=1e-4) & remaining
            matched = int(close.sum())
            if matched:
                counts["+".join(info["label"] for info in chosen)] = matched
                remaining &= ~close
    return {"subsets": counts, "unmatched": int(remaining.sum())}


def run_worker(args: argparse.Namespace) -> None:
    import torch

    import hivemind
    from hivemind.averaging import DecentralizedAverager

    torch.set_num_threads(1)
    emit = make_emit()
    kwargs = {"identity_path": args.identity_path} if args.identity_path else {}
    dht = hivemind.DHT(initial_peers=args.initial_peers.split(","), start=True, **kwargs)
    vector = torch.zeros(args.vector_size)
    averager = DecentralizedAverager(
        [vector],
        dht,
        start=True,
        prefix=PREFIX,
        target_group_size=args.target_group_size,
        min_group_size=2,
        min_matchmaking_time=args.min_matchmaking_time,
        request_timeout=args.request_timeout,
    )
    stop = threading.Event()  # set at EOF on stdin
    threading.Thread(target=wait_for_eof, args=(stop,), daemon=True).start()
    emit(event="ready", pid=os.getpid(), peer_id=str(dht.peer_id), averager_pid=averager.pid)
    pattern = pattern_of(args.vector_size)
    rng = random.Random(f"{args.label}-{os.getpid()}")
    while not stop.is_set():
        a, b, w = rng.uniform(-10, 10), rng.uniform(-10, 10), rng.uniform(0.5, 2.0)
        with averager.get_tensors() as tensors:
            tensors[0].copy_(a + b * pattern)
        started = time.time()
        record = {"event": "round", "start": started}
        control = averager.step(
            gather={"label": args.label, "a": a, "b": b, "w": w}, weight=w, timeout=args.step_timeout, wait=False
        )
        try:
            gathered = control.result(timeout=args.step_timeout + args.hang_slack)
            record.update(status="ok", group=sorted(info["label"] for info in gathered.values()))
            with averager.get_tensors() as tensors:
                result = tensors[0].clone()
            record.update(check_result(result, gathered, args.label, pattern))
        except FutureTimeout:
            record.update(status="hung", stage=str(control.stage))
            control.cancel()
        except Exception as e:
            record.update(status="failed", reason=f"{type(e).__name__}: {e}")
        record["end"] = time.time()
        emit(**record)
        if record["status"] == "failed" and "exited unexpectedly" in record["reason"]:
            break
        stop.wait(args.pause)
    averager.shutdown()
    dht.shutdown()
    emit(event="exit")


# ---------------------------------------------------------------------------------------------------- the driver


class Peer:
    def __init__(self, name: str, incarnation: int, identity_path: str, process, log_path: str):
        self.name, self.incarnation, self.identity_path = name, incarnation, identity_path
        self.label = f"{name}.{incarnation}"
        self.process, self.log_path = process, log_path
        self.started = time.time()
        self.ready_at: Optional[float] = None
        self.last_report = time.time()
        self.alive, self.frozen, self.stuck_reported = True, False, False
        self.averager_pid: Optional[int] = None
        self.rss: List[tuple] = []  # (time, averager process RSS, p2pd RSS)
        self.files: set = set()  # p2pd sockets and shared memory seen in use


class Chaos:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.rng = random.Random(args.seed)
        self.workdir = args.workdir or tempfile.mkdtemp(prefix="chaos_averaging_")
        os.makedirs(self.workdir, exist_ok=True)
        self.lock = threading.Lock()
        self.peers: Dict[str, Peer] = {}  # label -> peer (all incarnations)
        self.disturbed: Dict[str, List[list]] = collections.defaultdict(list)  # label -> [[start, end], ...]
        self.events: List[tuple] = []
        self.rounds: List[dict] = []
        self.leaked: List[str] = []
        self.chaos_ended = time.time() + args.duration - args.calm

    def start_peer(self, name: str, incarnation: int, identity_path: str) -> Peer:
        log_path = os.path.join(self.workdir, f"{name}.{incarnation}.log")
        command = [sys.executable, os.path.abspath(__file__), "--worker", "--label", f"{name}.{incarnation}"]
        command += ["--initial_peers", ",".join(self.initial_peers), "--identity_path", identity_path]
        for option in ("target_group_size", "vector_size", "min_matchmaking_time", "request_timeout"):
            command += [f"--{option}", str(getattr(self.args, option))]
        command += ["--step_timeout", str(self.args.step_timeout), "--hang_slack", str(self.args.hang_slack)]
        command += ["--pause", str(self.args.pause)]
        peer = Peer(name, incarnation, identity_path, spawn(command, log_path), log_path)
        with self.lock:
            self.peers[peer.label] = peer
        threading.Thread(target=self.read_reports, args=(peer,), daemon=True).start()
        return peer

    def read_reports(self, peer: Peer) -> None:
        for record in json_records(peer.process):
            with self.lock:
                peer.last_report = time.time()
                if record["event"] == "ready":
                    peer.ready_at, peer.averager_pid = time.time(), record["averager_pid"]
                elif record["event"] == "round":
                    record["label"] = peer.label
                    self.rounds.append(record)

    def living(self) -> List[Peer]:
        return [peer for peer in self.peers.values() if peer.alive]

    def act(self) -> None:
        candidates = [peer for peer in self.living() if not peer.frozen and peer.ready_at is not None]
        if len(candidates) <= self.args.min_untouched:
            return
        peer = self.rng.choice(candidates)
        action = self.rng.choice(self.args.actions.split(","))
        now = time.time()
        self.events.append((now, action, peer.label))
        if action == "freeze":
            peer.frozen = True
            window = [now, None]
            self.disturbed[peer.label].append(window)
            os.killpg(peer.process.pid, signal.SIGSTOP)
            seconds = self.rng.uniform(2, self.args.max_freeze)
            threading.Timer(seconds, self.thaw, args=(peer, window)).start()
            return
        self.disturbed[peer.label].append([now, float("inf")])
        peer.alive = False
        kill(peer.label, peer.process, action == "crash", self.args.orphan_grace, self.leaked, "still running")
        incarnation = peer.incarnation + 1
        same_identity = self.rng.random() < 0.5
        identity = peer.identity_path if same_identity else os.path.join(self.workdir, f"{peer.name}.{incarnation}.id")
        threading.Timer(self.args.restart_delay, self.start_peer, args=(peer.name, incarnation, identity)).start()
        self.events.append((now, "restart (same id)" if same_identity else "restart (new id)", peer.name))

    def thaw(self, peer: Peer, window: list) -> None:
        if peer.alive:
            os.killpg(peer.process.pid, signal.SIGCONT)
        window[1] = time.time()
        peer.frozen = False
        peer.last_report = time.time()

    def sample(self) -> None:
        for peer in self.living():
            if peer.ready_at is None:  # (still starting: its averager's pid is not known yet)
                continue
            averager_rss, p2pd_rss, files = measure(family(peer.process.pid), only_pid=peer.averager_pid, shm=True)
            peer.files.update(files)
            if averager_rss and p2pd_rss and time.time() > peer.ready_at + 10:  # (it warms up meanwhile)
                peer.rss.append((time.time(), averager_rss, p2pd_rss))

    def watch(self) -> None:
        limit = self.args.step_timeout + 2 * self.args.hang_slack + 30
        now = time.time()
        for peer in self.living():
            if not peer.frozen and not peer.stuck_reported and now - peer.last_report > limit:
                peer.stuck_reported = True
                self.events.append((now, "STUCK", peer.label))

    def run(self) -> None:
        from hivemind import DHT

        bootstrap = DHT(start=True)
        self.initial_peers = [str(maddr) for maddr in bootstrap.get_visible_maddrs()]
        started = time.time()
        for i in range(self.args.peers):
            self.start_peer(f"p{i}", 0, os.path.join(self.workdir, f"p{i}.0.id"))
        until, first_action = started + self.args.duration, started + self.args.chaos_every

        def sample() -> None:
            self.sample()
            self.watch()

        drive(self.lock, self.rng, self.args, until, self.chaos_ended, first_action, self.act, sample)
        self.finish()
        bootstrap.shutdown()

    def finish(self) -> None:
        self.stopped_at = time.time()  # rounds still running now may lose their group: the others are leaving
        close_all(self.living(), self.args.step_timeout + self.args.hang_slack + 15, self.leaked)
        time.sleep(1)
        self.files_left = sorted(path for peer in self.peers.values() for path in peer.files if os.path.exists(path))


# ---------------------------------------------------------------------------------------------------- the report


def classify(chaos: Chaos, record: dict) -> str:
    label = record["label"]
    start, end = record["start"], record["end"]

    def touched(who: str) -> bool:
        return any(s < end and (e is None or e > start) for s, e in chaos.disturbed.get(who, []))

    if record["status"] == "hung":
        return "hung (self frozen)" if touched(label) else "HUNG"
    if record["status"] == "failed":
        return "failed at the end of the run (the others left)" if record["end"] > chaos.stopped_at else "failed"
    if record["unmatched"]:
        return "WRONG average"
    used = set(itertools.chain.from_iterable(subset.split("+") for subset in record["subsets"]))
    excluded = set(record["group"]) - used
    if not excluded:
        return "ok, whole group"
    if all(touched(who) for who in excluded) or touched(label):
        return "ok, without the failed members"
    return "ok, but EXCLUDED a live member"


def report(chaos: Chaos) -> None:
    args = chaos.args
    print(
        f"\n{args.peers} peers, target group {args.target_group_size}, {args.vector_size} float32, "
        f"{args.duration:.0f} s ({args.calm:.0f} s calm), step timeout {args.step_timeout} s, logs in "
        f"{chaos.workdir}"
    )
    actions = collections.Counter(action for _, action, _ in chaos.events)
    print("chaos: " + ", ".join(f"{action} x{count}" for action, count in sorted(actions.items())))
    outcomes = collections.Counter(classify(chaos, record) for record in chaos.rounds)
    print("\n| Outcome | rounds |\n|---|---|")
    for outcome, count in outcomes.most_common():
        print(f"| {outcome} | {count} |")
    reasons = collections.Counter(
        normalize(r["reason"], hex_digits=8)
        for r in chaos.rounds
        if r["status"] == "failed" and r["end"] < chaos.stopped_at
    )
    print("\n| Failure reason | rounds |\n|---|---|")
    for reason, count in reasons.most_common(8):
        print(f"| {reason} | {count} |")
    calm_start = chaos.chaos_ended + args.restart_delay + 20
    calm = [r for r in chaos.rounds if calm_start <= r["start"] and r["end"] < chaos.stopped_at]
    calm_ok = [r for r in calm if r["status"] == "ok" and classify(chaos, r) == "ok, whole group"]
    print(
        f"\ncalm tail (rounds started after the last restart + 20 s): {len(calm_ok)}/{len(calm)} exact with the "
        f"whole group, group sizes {dict(collections.Counter(len(r.get('group', [])) for r in calm))}"
    )
    for name, rounds in (
        ("ok", [r for r in chaos.rounds if r["status"] == "ok"]),
        ("failed", [r for r in chaos.rounds if r["status"] == "failed"]),
    ):
        durations = sorted(r["end"] - r["start"] for r in rounds)
        if durations:
            print(
                f"{name} step duration: median {statistics.median(durations):.2f} s, p90 "
                f"{durations[int(0.9 * (len(durations) - 1))]:.2f} s, max {durations[-1]:.2f} s ({len(durations)})"
            )
    print(f"stuck peers: {[label for _, action, label in chaos.events if action == 'STUCK']}")
    print(f"leaked processes: {chaos.leaked or 'none'}")
    print(f"files of peers left behind after all exited: {len(chaos.files_left)} {chaos.files_left[:4]}")
    rounds = collections.Counter(r["label"] for r in chaos.rounds)
    print_memory_table(chaos.peers.values(), "rounds", lambda peer: rounds[peer.label], "averager RSS")
    print_warnings([peer.log_path for peer in chaos.peers.values()], "peers", hex_digits=8)


def records_of(chaos: Chaos) -> dict:
    rss = {peer.label: peer.rss for peer in chaos.peers.values()}
    return {"events": chaos.events, "rounds": chaos.rounds, "disturbed": chaos.disturbed, "rss": rss}


def main() -> None:
    args = parse_args()
    if args.worker:
        run_worker(args)
        return
    chaos = Chaos(args)
    run_chaos(chaos, chaos.peers, records_of)
    report(chaos)


if __name__ == "__main__":
    main()
