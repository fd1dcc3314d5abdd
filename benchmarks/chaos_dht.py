"""Chaos test of the DHT: peers store and get keys while a driver kills, freezes, restarts and adds peers.

    python benchmarks/chaos_dht.py --peers 12 --duration 240
    python benchmarks/chaos_dht.py --peers 10 --duration 180 --actions freeze --max_freeze 20

Each peer is a process of its own (in a session of its own, with its DHT process and p2pd below it) whose
``--threads`` threads call its DHT at once, in loops of random calls on a shared set of keys (a quarter of them on
one hot key): ``store`` of a plain key (values ``"<peer>#<thread>.<n>"``, each expiring 15..180 s from now, so
later stores of a key usually overwrite it with a newer expiration and some values expire during the run), ``store``
of a subkey of a dictionary key (a few subkeys shared by all peers), and ``get`` with ``latest=True`` or
``latest=False``. The first peer also stores ``--sentinels`` keys once at the
start (expiring after ``--sentinel_ttl`` s) that everyone reads and nobody overwrites: they survive only if their
replicas are handed over to newcomers as the original holders die. The driver learns every acknowledged store
(``store`` returned True) and checks every ``get`` against them:

- **EXPIRED**: a returned value (or subkey) that had expired before the get started (never allowed);
- **CORRUPT**: a returned value that no peer ever stored with that expiration (never allowed);
- **lost**: nothing returned for a key (or subkey) whose newest acknowledged store finished at least 1 s before the
  get started (a get may join a search that its peer began up to 1 s earlier) and has not expired; **stale**: an
  older value returned instead. Both are *explained* when every one of the ``num_replicas`` peers nearest to the key
  among those up at the time of that store (by node id, which the driver learns from each peer) was killed, left or
  frozen since; otherwise they count as **LOST** / **STALE**.
  Stale values of ``latest=False`` gets are counted apart: that get stops at the first live entry it finds (a
  cache may hold an older one), so only ``latest=True`` promises the newest.
- **HANG**: a call still unanswered ``--hang_after`` seconds after it started (unless its own peer was frozen).

Chaos actions, one every ``--chaos_every`` seconds on average (``--min_untouched`` peers are left alone):
``crash`` (SIGKILL to the peer's process group), ``kill_main`` (SIGKILL to the peer's main process only: its DHT
process and p2pd must exit by themselves within ``--orphan_grace`` s or count as **leaked**), ``freeze`` (SIGSTOP
for 2..``--max_freeze`` s, then SIGCONT), ``leave`` (graceful shutdown), ``join`` (a new peer, up to
``--max_peers``). A killed peer comes back after ``--restart_delay`` s, half the time with the same identity and
port, otherwise with a new identity; every start bootstraps from one or two random live peers. Each peer also
reports its routing table every ``--probe_every`` s; after ``--calm`` s without chaos at the end, the table shows
how many live peers each table misses and how many dead ones it still holds. The script prints outcome tables,
call durations, RSS of each peer's processes and p2pd over time, leaked processes and files, and log warnings.
"""

import argparse
import collections
import os
import random
import signal
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
    percentile,
    print_memory_table,
    print_warnings,
    reap_orphans,
    run_chaos,
    spawn,
    wait_for_eof,
)
from chaos_dht_checks import SUBKEYS, Checker


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", type=int, default=12, help="peers at the start")
    parser.add_argument("--max_peers", type=int, default=16, help="join adds peers up to this many")
    parser.add_argument("--keys", type=int, default=40, help="plain keys")
    parser.add_argument("--dict_keys", type=int, default=10, help="dictionary keys")
    parser.add_argument("--ttl", default="15,60,180", help="comma-separated lifetimes of stored values (s)")
    parser.add_argument("--sentinels", type=int, default=10, help="keys stored once by the first peer, then only read")
    parser.add_argument("--sentinel_ttl", type=float, default=900, help="lifetime of the sentinel keys (s)")
    parser.add_argument("--duration", type=float, default=240, help="seconds in all, the calm tail included")
    parser.add_argument("--calm", type=float, default=40, help="seconds without chaos at the end")
    parser.add_argument("--chaos_every", type=float, default=8, help="mean seconds between two chaos actions")
    parser.add_argument("--actions", default="crash,kill_main,freeze,leave,join", help="comma-separated")
    parser.add_argument("--max_freeze", type=float, default=15, help="seconds")
    parser.add_argument("--restart_delay", type=float, default=2, help="seconds from a kill to the restart")
    parser.add_argument("--min_untouched", type=int, default=4, help="peers the driver leaves running at any time")
    parser.add_argument("--threads", type=int, default=2, help="threads of each peer calling its DHT at once")
    parser.add_argument("--pause", type=float, default=0.4, help="seconds between two operations of a peer")
    parser.add_argument("--hang_after", type=float, default=30.0, help="seconds after which a call is hung")
    parser.add_argument("--orphan_grace", type=float, default=15.0, help="seconds for orphans to exit")
    parser.add_argument("--probe_every", type=float, default=10.0, help="seconds between routing table reports")
    parser.add_argument("--rss_every", type=float, default=10.0, help="seconds between memory samples")
    parser.add_argument("--bucket_size", type=int, default=20, help="DHT(bucket_size=...): Kademlia k")
    parser.add_argument("--num_replicas", type=int, default=5, help="DHT(num_replicas=...)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None, help="where peer logs and identities go (default: a temp dir)")
    for hidden in ("label", "initial_peers", "identity_path", "port"):
        parser.add_argument(f"--{hidden}", default="", help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args()


# ---------------------------------------------------------------------------------------------------- the peers


async def routing_snapshot(dht, node) -> List[str]:
    return [str(peer_id) for _, peer_id in node.protocol.routing_table.items()]


async def own_node_id(dht, node) -> int:
    return int(node.node_id)


def as_record(found):
    if found is None:
        return None
    value, expiration = found
    if isinstance(value, dict):
        return {str(subkey): [item.value, item.expiration_time] for subkey, item in value.items()}
    return [value, expiration]


def run_worker(args: argparse.Namespace) -> None:
    import hivemind

    emit = make_emit(threading.Lock())
    stop = threading.Event()
    port = int(args.port or 0)
    initial_peers = [maddr for maddr in args.initial_peers.split(",") if maddr]
    dht = hivemind.DHT(
        initial_peers=initial_peers or None,
        start=True,
        identity_path=args.identity_path,
        host_maddrs=[f"/ip4/127.0.0.1/tcp/{port}"],
        bucket_size=args.bucket_size,
        num_replicas=args.num_replicas,
    )
    threading.Thread(target=wait_for_eof, args=(stop,), daemon=True).start()
    maddrs = [str(maddr) for maddr in dht.get_visible_maddrs()]
    emit(event="ready", peer_id=str(dht.peer_id), node_id=dht.run_coroutine(own_node_id), maddrs=maddrs)
    ttls = [float(ttl) for ttl in args.ttl.split(",")]
    for i in range(args.sentinels if args.label == "p0.0" else 0):  # the first peer stores the sentinels once
        record = {"event": "op", "op": "store", "key": f"s{i}", "subkey": None, "value": f"{args.label}#s{i}"}
        record.update(start=time.time(), expiration=hivemind.get_dht_time() + args.sentinel_ttl)
        found = dht.store(record["key"], record["value"], record["expiration"])
        emit(**record, status="ok", result=found, end=time.time())

    def pick(rng: random.Random, prefix: str, count: int) -> str:  # a quarter of the calls go to one hot key
        return f"{prefix}{0 if rng.random() < 0.25 else rng.randrange(count)}"

    def run_calls(thread: int) -> None:
        rng = random.Random(f"{args.label}-{os.getpid()}-{thread}")
        next_probe, seq = time.time(), 0
        while not stop.is_set():
            if thread == 0 and time.time() >= next_probe:
                future = dht.run_coroutine(routing_snapshot, return_future=True)
                try:
                    emit(event="table", time=time.time(), peers=future.result(timeout=args.hang_after))
                except Exception as e:
                    emit(event="table_failed", time=time.time(), reason=f"{type(e).__name__}: {e}")
                next_probe = time.time() + args.probe_every
            kind = rng.choices(["store", "store_subkey", "get_latest", "get"], weights=[4, 2, 3, 2])[0]
            record = {"event": "op", "op": kind, "start": time.time()}
            if kind.startswith("store"):
                seq += 1
                record["value"] = f"{args.label}#{thread}.{seq}"
                record["expiration"] = hivemind.get_dht_time() + rng.choice(ttls)
                if kind == "store":
                    record["key"], record["subkey"] = pick(rng, "k", args.keys), None
                else:
                    record["key"], record["subkey"] = pick(rng, "d", args.dict_keys), rng.choice(SUBKEYS)
                emit(**dict(record, event="attempt"))  # a store cut short by a kill may still reach replicas
                future = dht.store(
                    record["key"], record["value"], record["expiration"], subkey=record["subkey"], return_future=True
                )
            else:
                choices = [("k", args.keys), ("d", args.dict_keys)] + [("s", args.sentinels)] * bool(args.sentinels)
                record["key"] = pick(rng, *rng.choices(choices, [6, 3, 2][: len(choices)])[0])
                future = dht.get(record["key"], latest=kind == "get_latest", return_future=True)
            try:
                result = future.result(timeout=args.hang_after)
                record.update(status="ok", result=bool(result) if kind.startswith("store") else as_record(result))
            except FutureTimeout:
                record.update(status="hung")
                future.cancel()
            except Exception as e:
                record.update(status="failed", reason=f"{type(e).__name__}: {e}")
            record["end"] = time.time()
            emit(**record)
            stop.wait(args.pause)

    threads = [threading.Thread(target=run_calls, args=(i,)) for i in range(args.threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    dht.shutdown()
    emit(event="exit")


# ---------------------------------------------------------------------------------------------------- the driver


class Peer:
    def __init__(self, name: str, incarnation: int, identity_path: str, port: int, process, log):
        self.name, self.incarnation, self.identity_path, self.port = name, incarnation, identity_path, port
        self.label = f"{name}.{incarnation}"
        self.process, self.log_path = process, log
        self.started = time.time()
        self.ready_at: Optional[float] = None
        self.gone_at = float("inf")
        self.peer_id, self.node_id, self.maddrs = "", None, []
        self.alive, self.frozen, self.fate = True, False, "ran to the end"
        self.freezes: List[list] = []
        self.tables: List[tuple] = []  # (time, peer ids in the routing table)
        self.rss: List[tuple] = []  # (time, python processes' RSS, p2pd RSS)
        self.files: set = set()


class Chaos:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.rng = random.Random(args.seed)
        self.workdir = args.workdir or tempfile.mkdtemp(prefix="chaos_dht_")
        os.makedirs(self.workdir, exist_ok=True)
        self.lock = threading.Lock()
        self.peers: Dict[str, Peer] = {}
        self.events: List[tuple] = []
        self.ops: List[dict] = []
        self.attempts: List[dict] = []  # every store, announced before it is sent
        self.leaked: List[str] = []
        self.failed_starts = 0
        self.next_name = args.peers
        self.chaos_ended = time.time() + args.duration - args.calm

    def living(self, ready: bool = False) -> List[Peer]:
        return [p for p in self.peers.values() if p.alive and (p.ready_at is not None or not ready)]

    def start_peer(self, name: str, incarnation: int, identity_path: str, port: int = 0) -> None:
        with self.lock:
            sources = [p for p in self.living(ready=True) if not p.frozen]
            initial = [
                m for p in self.rng.sample(sources, min(len(sources), self.rng.choice([1, 2]))) for m in p.maddrs
            ]
        log_path = os.path.join(self.workdir, f"{name}.{incarnation}.log")
        command = [sys.executable, os.path.abspath(__file__), "--worker", "--label", f"{name}.{incarnation}"]
        command += ["--initial_peers", ",".join(initial), "--identity_path", identity_path, "--port", str(port)]
        options = (
            "keys dict_keys ttl sentinels sentinel_ttl bucket_size num_replicas threads pause hang_after probe_every"
        )
        for option in options.split():
            command += [f"--{option}", str(getattr(self.args, option))]
        peer = Peer(name, incarnation, identity_path, port, spawn(command, log_path), log_path)
        with self.lock:
            self.peers[peer.label] = peer
        threading.Thread(target=self.read_reports, args=(peer,), daemon=True).start()

    def read_reports(self, peer: Peer) -> None:
        for record in json_records(peer.process):
            with self.lock:
                if record["event"] == "ready":
                    peer.ready_at, peer.peer_id, peer.node_id = time.time(), record["peer_id"], record["node_id"]
                    peer.maddrs = record["maddrs"]
                    peer.port = int(peer.maddrs[0].split("/tcp/")[1].split("/")[0])
                elif record["event"] == "table":
                    peer.tables.append((record["time"], record["peers"]))
                elif record["event"] == "attempt":
                    self.attempts.append(record)
                elif record["event"] == "op":
                    record["label"] = peer.label
                    self.ops.append(record)
        with self.lock:
            if peer.ready_at is None and peer.alive:  # it died while starting (e.g. its bootstrap peer was killed)
                self.failed_starts += 1
                peer.alive, peer.gone_at = False, time.time()
                self.events.append((time.time(), "START FAILED", peer.label))
                threading.Timer(
                    1.0, self.start_peer, args=(peer.name, peer.incarnation + 1, peer.identity_path)
                ).start()

    def act(self) -> None:
        ready = [p for p in self.living(ready=True) if not p.frozen]
        action = self.rng.choice(self.args.actions.split(","))
        if action == "join":
            if len(self.living()) < self.args.max_peers:
                name, self.next_name = f"p{self.next_name}", self.next_name + 1
                self.events.append((time.time(), "join", name))
                path = os.path.join(self.workdir, f"{name}.0.id")
                threading.Thread(target=self.start_peer, args=(name, 0, path), daemon=True).start()
            return
        if len(ready) <= self.args.min_untouched:
            return
        peer = self.rng.choice(ready)
        now = time.time()
        self.events.append((now, action, peer.label))
        if action == "freeze":
            peer.frozen = True
            window = [now, float("inf")]
            peer.freezes.append(window)
            os.killpg(peer.process.pid, signal.SIGSTOP)
            threading.Timer(self.rng.uniform(2, self.args.max_freeze), self.thaw, args=(peer, window)).start()
            return
        peer.alive, peer.gone_at, peer.fate = False, now, action
        if action == "leave":
            orphans = (peer.label, family(peer.process.pid), self.args.orphan_grace, self.leaked, "still running")
            peer.process.stdin.close()
            threading.Thread(target=reap_orphans, args=orphans, daemon=True).start()
            return
        kill(peer.label, peer.process, action == "crash", self.args.orphan_grace, self.leaked, "still running")
        incarnation = peer.incarnation + 1
        same = self.rng.random() < 0.5
        identity = peer.identity_path if same else os.path.join(self.workdir, f"{peer.name}.{incarnation}.id")
        delay = self.args.restart_delay
        threading.Timer(
            delay, self.start_peer, args=(peer.name, incarnation, identity, peer.port if same else 0)
        ).start()
        self.events.append((now, "restart (same id and port)" if same else "restart (new id)", peer.name))

    def thaw(self, peer: Peer, window: list) -> None:
        with self.lock:
            if peer.alive:
                os.killpg(peer.process.pid, signal.SIGCONT)
            window[1] = time.time()
            peer.frozen = False

    def sample(self) -> None:
        for peer in self.living(ready=True):
            python_rss, p2pd_rss, files = measure(family(peer.process.pid))
            peer.files.update(files)
            if python_rss:
                peer.rss.append((time.time(), python_rss, p2pd_rss))

    def run(self) -> None:
        started = time.time()
        self.start_peer("p0", 0, os.path.join(self.workdir, "p0.0.id"))
        for i in range(1, self.args.peers):
            while not self.living(ready=True):
                time.sleep(0.1)
            self.start_peer(f"p{i}", 0, os.path.join(self.workdir, f"p{i}.0.id"))
        until, first_action = started + self.args.duration, time.time() + self.args.chaos_every
        drive(self.lock, self.rng, self.args, until, self.chaos_ended, first_action, self.act, self.sample)
        self.finish()

    def finish(self) -> None:
        close_all(self.living(), self.args.hang_after + 15, self.leaked)
        time.sleep(1)
        self.files_left = collections.Counter(
            peer.fate for peer in self.peers.values() for path in peer.files if os.path.exists(path)
        )


# ---------------------------------------------------------------------------------------------------- the report


def report(chaos: Chaos) -> None:
    args = chaos.args
    print(
        f"\n{args.peers} peers at start (at most {args.max_peers}), {args.keys} keys + {args.dict_keys} dictionary "
        f"keys, {args.sentinels} sentinels, ttl {args.ttl} s, bucket_size {args.bucket_size}, num_replicas "
        f"{args.num_replicas}, {args.duration:.0f} s ({args.calm:.0f} s calm), chaos every {args.chaos_every} s, "
        f"logs in {chaos.workdir}"
    )
    actions = collections.Counter(action for _, action, _ in chaos.events)
    print("chaos: " + ", ".join(f"{action} x{count}" for action, count in sorted(actions.items())))
    checker = Checker(chaos, args.num_replicas)
    checker.run()
    print("\n| Get | keys | outcome | keys or subkeys |\n|---|---|---|---|")
    for (kind, keys, outcome), count in sorted(checker.outcomes.items()):
        print(f"| {kind} | {keys} | {outcome} | {count} |")
    for outcome, examples in checker.examples.items():
        print(f"  {outcome}, e.g.: " + "\n    ".join(examples[:3]))
    stores = [op for op in chaos.ops if op["op"].startswith("store") and op["status"] == "ok"]
    print(f"\nstores: {len(stores)}, acknowledged {sum(bool(op['result']) for op in stores)}")
    print("\n| Call | count | ok | failed | HUNG | hung (own peer frozen) | p50 / p90 / p99 / max (s) |")
    print("|---|---|---|---|---|---|---|")
    for kind in ("store", "store_subkey", "get_latest", "get"):
        ops = [op for op in chaos.ops if op["op"] == kind]
        if not ops:
            continue
        frozen = [op for op in ops if checker.frozen(chaos.peers[op["label"]], op["start"], op["end"])]
        hung = [op for op in ops if op["status"] == "hung"]
        own = sum(1 for op in hung if op in frozen)
        times = sorted(op["end"] - op["start"] for op in ops if op not in frozen and op["status"] == "ok")
        print(
            f"| {kind} | {len(ops)} | {sum(op['status'] == 'ok' for op in ops)} | "
            f"{sum(op['status'] == 'failed' for op in ops)} | {len(hung) - own} | {own} | "
            + " / ".join(f"{percentile(times, q):.2f}" for q in (0.5, 0.9, 0.99, 1.0))
            + " |"
        )
    reasons = collections.Counter(normalize(op["reason"]) for op in chaos.ops if op["status"] == "failed")
    for reason, count in reasons.most_common(5):
        print(f"  failed x{count}: {reason}")
    living = chaos.living(ready=True)
    live_ids = {p.peer_id for p in living}
    dead_ids = {p.peer_id for p in chaos.peers.values() if p.peer_id and p.peer_id not in live_ids}
    print(f"\nrouting tables at the end of the calm tail ({len(living)} live peers):")
    print("| Peer | entries | live peers missing | dead peers held |\n|---|---|---|---|")
    for peer in living:
        tables = [table for t, table in peer.tables if t >= chaos.chaos_ended + args.calm / 2]
        if tables:
            table = set(tables[-1])
            missing = len(live_ids - table - {peer.peer_id})
            print(f"| {peer.label} | {len(table)} | {missing} | {len(table & dead_ids)} |")
    print(f"\nfailed starts: {chaos.failed_starts}; leaked processes: {chaos.leaked or 'none'}")
    left = ", ".join(f"{count} of peers that ended by {fate}" for fate, count in chaos.files_left.items())
    print(f"p2pd sockets left behind after all exited: {left or 'none'} (a crash kills p2pd before it can clean up)")
    ops = collections.Counter(op["label"] for op in chaos.ops)
    print_memory_table(chaos.peers.values(), "ops", lambda peer: ops[peer.label], "python RSS", skip=1)
    print_warnings([peer.log_path for peer in chaos.peers.values()], "peers")


def records_of(chaos: Chaos) -> dict:
    peers = {label: [p.peer_id, p.node_id, p.ready_at, p.gone_at, p.freezes] for label, p in chaos.peers.items()}
    return {"events": chaos.events, "ops": chaos.ops, "attempts": chaos.attempts, "peers": peers}


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
