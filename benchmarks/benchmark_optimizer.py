"""
Collaborative training with hivemind.Optimizer: several peers (the last one in client mode) train a small MLP on
scikit-learn's bundled digits (8x8 images, 10 classes, no download) and the script reports seconds per epoch, test
accuracy per epoch next to local training with the same global batch, each peer's memory, and where the time of an
epoch goes (computing, accumulating, waiting for the averaging group, all-reduce, the rest of the global step).
By default each local step of 8 samples takes 0.8 s (--step_time, simulated compute of a bigger model), so that an
epoch holds about 6.4 s of compute per peer and the averaging rounds' matchmaking can overlap it, as in real training;
with --step_time 0 the MLP's own compute is negligible and an epoch lasts as long as the global step: about
matchmaking_time in hivemind 1.1.12, which waits out the matchmaking time of every round.

    python benchmarks/benchmark_optimizer.py                          # 4 peers (one client-mode), target batch 256
    python benchmarks/benchmark_optimizer.py --peers 2 --epochs 5
    python benchmarks/benchmark_optimizer.py --local_only             # local training alone (the reference curve)
    python benchmarks/compare.py benchmarks/benchmark_optimizer.py    # ours and the original 1.1.12, same run
    python benchmarks/compare.py benchmarks/benchmark_optimizer.py --matchmaking_time 15 --step_time 0 --epochs 5
                                                                      # the Optimizer's defaults, fast steps

Only the public API is used (hivemind.DHT, hivemind.Optimizer, its grad_averager / state_averager attributes and the
StepControl stages), so the same script runs on the original library.
"""

import argparse
import functools
import json
import multiprocessing as mp
import os
import statistics
import threading
import time

import torch

STAGE_POLL_PERIOD = 0.002  # seconds between two looks at an averaging round's stage (breakdown only)


def load_data(seed: int):
    from sklearn.datasets import load_digits  # bundled with scikit-learn: nothing is downloaded

    digits = load_digits()
    features = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    labels = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    test, train = order[:360], order[360:]
    return features[train], labels[train], features[test], labels[test]


def make_model(hidden: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(64, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, hidden), torch.nn.ReLU(),
        torch.nn.Linear(hidden, 10),
    )  # fmt: skip


def accuracy(model: torch.nn.Module, features: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(features).argmax(-1) == labels).float().mean().item()


def tree_memory_mib(proportional: bool = False) -> float:
    """Memory of this process and its children in MiB: RSS, or PSS (shared pages split between the processes that
    map them, so that the PSS of several peers adds up; slower to read)."""
    import psutil

    total = 0
    for process in [psutil.Process(), *psutil.Process().children(recursive=True)]:
        try:
            total += process.memory_full_info().pss if proportional else process.memory_info().rss
        except (psutil.Error, AttributeError):
            pass
    return total / 2**20


class RoundWatcher:
    """
    Records when the averaging rounds of one averager change stage (looking for a group -> group found, waiting for
    the trigger -> all-reduce running -> done), by wrapping its public ``schedule_step`` / ``step`` and polling the
    ``StepControl.stage`` of the rounds they return. Used for the time breakdown of peer 0 only.
    """

    def __init__(self, averager, name: str):
        self.name, self.rounds, self._lock = name, [], threading.Lock()
        for method in ("schedule_step", "step"):
            original = getattr(averager, method)
            setattr(averager, method, self._wrap(original))
        self._stop = threading.Event()
        threading.Thread(target=self._poll, daemon=True).start()

    def _wrap(self, original):
        def wrapped(*args, **kwargs):
            control = kwargs.get("control") or kwargs.get("averaging_control")
            started = time.perf_counter()
            result = original(*args, **kwargs)
            for candidate in (control, result):
                if candidate is not None and hasattr(candidate, "stage") and hasattr(candidate, "done"):
                    self._track(candidate, started)
            return result

        return wrapped

    def _track(self, control, started: float) -> None:
        with self._lock:
            if all(record["control"] is not control for record in self.rounds):
                self.rounds.append(dict(control=control, created=started, stages={}, done=None))

    def _poll(self) -> None:
        while not self._stop.wait(STAGE_POLL_PERIOD):
            with self._lock:
                pending = [record for record in self.rounds if record["done"] is None]
            for record in pending:
                now = time.perf_counter()
                try:
                    stage = record["control"].stage.name
                except Exception:
                    stage = "UNKNOWN"
                record["stages"].setdefault(stage, now)
                if record["control"].done():
                    record["done"] = now

    def rounds_between(self, start: float, end: float):
        """Rounds that ended in [start, end): (matchmaking seconds, all-reduce seconds, finished at)."""
        found = []
        with self._lock:
            for record in self.rounds:
                if record["done"] is None or not start <= record["done"] < end:
                    continue
                stages = record["stages"]
                group_found = min(
                    [stages[s] for s in ("AWAITING_TRIGGER", "RUNNING_ALLREDUCE") if s in stages], default=None
                )
                allreduce = stages.get("RUNNING_ALLREDUCE")
                found.append(dict(
                    created=record["created"], group_found=group_found, allreduce_started=allreduce,
                    done=record["done"], failed=bool(_failed(record["control"])),
                ))  # fmt: skip
        return found


def _failed(control) -> bool:
    try:
        return control.cancelled() or control.exception() is not None
    except Exception:
        return True


def run_peer(index, args, data, maddr_queue, start_barrier, stop_barrier, results):
    import hivemind
    from hivemind.optim.grad_averager import GradientAverager

    torch.set_num_threads(1)
    train_x, train_y, test_x, test_y = data
    client_mode = index == args.peers - 1 and args.peers > 1 and not args.no_client
    initial_peers = [] if index == 0 else maddr_queue.get()
    dht = hivemind.DHT(
        initial_peers=initial_peers, client_mode=client_mode, host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True
    )
    if index == 0:
        maddrs = [str(maddr) for maddr in dht.get_visible_maddrs()]
        for _ in range(args.peers - 1):
            maddr_queue.put(maddrs)
    model = make_model(args.hidden, args.seed)
    # (hivemind 1.1.12 gives averager_opts to the state averager only: the factory sets them for its gradient averager)
    averager_opts = {} if args.target_group_size is None else dict(target_group_size=args.target_group_size)
    opt = hivemind.Optimizer(
        dht=dht, run_id="benchmark_optimizer", target_batch_size=args.target_batch_size,
        batch_size_per_step=args.batch_size, optimizer=lambda params: torch.optim.Adam(params, lr=args.lr),
        params=model.parameters(), matchmaking_time=args.matchmaking_time, averaging_timeout=args.averaging_timeout,
        averager_opts=averager_opts, grad_averager_factory=functools.partial(GradientAverager, **averager_opts),
        verbose=False,
    )  # fmt: skip
    watchers = {}
    if index == 0 and not args.no_breakdown:
        watchers = dict(grad=RoundWatcher(opt.grad_averager, "grad"), state=RoundWatcher(opt.state_averager, "state"))
    generator = torch.Generator().manual_seed(args.seed + 1 + index)
    # the clock starts once every peer sees the whole swarm, else the first ones would run epochs alone
    # (one sample is reported: hivemind 1.1.12 does not count a peer that reported none)
    opt.tracker.report_local_progress(opt.local_epoch, 1)
    join_started = time.monotonic()
    deadline = join_started + args.join_timeout
    while opt.tracker.global_progress.num_peers < args.peers and time.monotonic() < deadline:
        time.sleep(0.05)
    if opt.tracker.global_progress.num_peers < args.peers:
        print(f"peer {index}: sees {opt.tracker.global_progress.num_peers} of {args.peers} peers after "
              f"{args.join_timeout} s; starting anyway", flush=True)  # fmt: skip
    joined = time.monotonic() - join_started
    start_barrier.wait()
    with opt.tracker.pause_updates():
        pass  # the tracker measures this peer's speed from here: the wait above was not training
    epochs, failures = [], 0
    epoch, epoch_started = opt.local_epoch, time.perf_counter()
    started = epoch_started
    compute = accumulate = 0.0
    steps = 0
    while opt.local_epoch < args.epochs and time.perf_counter() - started < args.timeout:
        batch = torch.randint(0, len(train_y), (args.batch_size,), generator=generator)
        begin = time.perf_counter()
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(train_x[batch]), train_y[batch]).backward()
        if args.step_time > 0:
            time.sleep(args.step_time)  # a slower model / device: the time one real training step would take
        step_begin = time.perf_counter()
        try:
            opt.step()
        except ValueError as e:
            # hivemind 1.1.12 raises this in a client-mode peer at the end of every epoch, after the update itself
            if "client mode" not in str(e):
                raise
            failures += 1
        step_end = time.perf_counter()
        steps += 1
        if opt.local_epoch == epoch:
            compute, accumulate = compute + step_begin - begin, accumulate + step_end - step_begin
            continue
        record = dict(epoch=opt.local_epoch, start=epoch_started - started, end=step_end - started,
                      compute=compute + step_begin - begin, accumulate=accumulate, steps=steps,
                      global_step=step_end - step_begin,
                      accuracy=accuracy(model, test_x, test_y), rss=tree_memory_mib())  # fmt: skip
        record.update(global_begin=step_begin, global_end=step_end, epoch_begin=epoch_started)
        epochs.append(record)
        epoch, epoch_started, compute, accumulate, steps = opt.local_epoch, time.perf_counter(), 0.0, 0.0, 0
    time.sleep(10 * STAGE_POLL_PERIOD)  # the poller sees the last round's end
    for number, record in enumerate(epochs):
        # a gradient round ends inside the global step that waits for it; a state round runs in the background
        windows = dict(grad=(record["global_begin"], record["global_end"] + 0.05),
                       state=(record["epoch_begin"], epochs[number + 1]["epoch_begin"]
                              if number + 1 < len(epochs) else float("inf")))  # fmt: skip
        for name, watcher in watchers.items():
            record[name] = [
                {
                    key: value - record["global_begin"] if isinstance(value, float) else value
                    for key, value in r.items()
                }
                for r in watcher.rounds_between(*windows[name])
            ]
    pss = tree_memory_mib(proportional=True)
    results.put(dict(index=index, epochs=epochs, client_mode=client_mode, failures=failures, pss=pss, joined=joined))
    stop_barrier.wait()
    opt.shutdown()
    dht.shutdown()


def local_training(args, data):
    """The same model trained alone with one optimizer step per global batch (one collaborative epoch)."""
    train_x, train_y, test_x, test_y = data
    torch.set_num_threads(1)
    model = make_model(args.hidden, args.seed)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    generator = torch.Generator().manual_seed(args.seed)
    accuracies = []
    for _ in range(args.epochs):
        batch = torch.randint(0, len(train_y), (args.target_batch_size,), generator=generator)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(train_x[batch]), train_y[batch]).backward()
        opt.step()
        accuracies.append(accuracy(model, test_x, test_y))
    return accuracies


def describe_breakdown(record) -> str:
    """Where the global step of one epoch went, from the gradient round that finished during it."""
    grad = [r for r in record.get("grad", []) if r["done"] >= 0]
    if not grad:
        return f"{'n/a':>8} {'n/a':>9} {record['global_step']:>8.2f}"
    last = grad[-1]
    # time inside the global step: waiting until the group was found, then the all-reduce, then the rest
    group_found = last["group_found"] if last["group_found"] is not None else last["done"]
    wait_group = min(max(group_found, 0.0), record["global_step"])
    allreduce_start = last["allreduce_started"] if last["allreduce_started"] is not None else group_found
    allreduce = min(max(last["done"] - max(allreduce_start, 0.0), 0.0), record["global_step"] - wait_group)
    rest = record["global_step"] - wait_group - allreduce
    return f"{wait_group:8.2f} {allreduce:9.2f} {rest:8.2f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", type=int, default=4, help="peers, the last one in client mode")
    parser.add_argument("--no_client", action="store_true", help="no client-mode peer")
    parser.add_argument("--target_batch_size", type=int, default=256, help="samples per epoch, whole swarm")
    parser.add_argument("--batch_size", type=int, default=8, help="samples per local step")
    parser.add_argument(
        "--step_time",
        type=float,
        default=0.8,
        help="seconds each local step takes at least (simulated compute; 0: the MLP's real time)",
    )
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--matchmaking_time", type=float, default=5.0, help="seconds")
    parser.add_argument("--averaging_timeout", type=float, default=30.0, help="seconds")
    parser.add_argument("--target_group_size", type=int, default=None, help="averager_opts: start a full group")
    parser.add_argument("--hidden", type=int, default=128, help="hidden units of the MLP")
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--join_timeout", type=float, default=60, help="seconds to wait for peers to see each other")
    parser.add_argument("--timeout", type=float, default=900, help="give up after this many seconds")
    parser.add_argument("--local_only", action="store_true", help="only local training with the same global batch")
    parser.add_argument("--no_breakdown", action="store_true", help="do not time the averaging rounds' stages")
    parser.add_argument("--json", action="store_true", help="also print the figures as one JSON line at the end")
    args = parser.parse_args()

    data = load_data(args.seed)
    local = local_training(args, data)
    if args.local_only:
        print(f"local training, one Adam step per {args.target_batch_size} samples, epochs={args.epochs}")
        print("epoch  local_accuracy")
        for epoch, value in enumerate(local, start=1):
            print(f"{epoch:5d}  {value:14.3f}")
        return

    context = mp.get_context("fork")
    maddr_queue, results = context.Queue(), context.Queue()
    start_barrier, stop_barrier = context.Barrier(args.peers), context.Barrier(args.peers)
    processes = [
        context.Process(target=run_peer, args=(i, args, data, maddr_queue, start_barrier, stop_barrier, results))
        for i in range(args.peers)
    ]
    for process in processes:
        process.start()
    try:
        reports = sorted((results.get(timeout=args.timeout) for _ in processes), key=lambda report: report["index"])
    finally:
        for process in processes:
            process.join(60)
            if process.is_alive():
                process.kill()

    print(f"peers={args.peers} (client-mode: {0 if args.no_client or args.peers == 1 else 1}) "
          f"target_batch_size={args.target_batch_size} batch_size={args.batch_size} step_time={args.step_time} "
          f"epochs={args.epochs} "
          f"matchmaking_time={args.matchmaking_time} averaging_timeout={args.averaging_timeout} "
          f"target_group_size={args.target_group_size}")  # fmt: skip
    first = reports[0]["epochs"]
    print("epoch  end_s  epoch_s  accuracy  local_acc  steps  compute  accumulate  global  wait_grp  allreduce  rest")
    for record in first:
        print(f"{record['epoch']:5d} {record['end']:6.2f} {record['end'] - record['start']:8.2f} "
              f"{record['accuracy']:9.3f} {local[record['epoch'] - 1]:10.3f} {record['steps']:6d} "
              f"{record['compute']:8.2f} "
              f"{record['accumulate']:11.2f} {record['global_step']:7.2f} "
              f"{describe_breakdown(record)}")  # fmt: skip
    for name in ("grad", "state"):
        rounds = [r for record in first for r in record.get(name, [])]
        if rounds:
            matchmaking = [r["group_found"] - r["created"] for r in rounds if r["group_found"] is not None]
            allreduce = [r["done"] - r["allreduce_started"] for r in rounds if r["allreduce_started"] is not None]
            print(f"{name} rounds of peer 0: {len(rounds)} ({sum(r['failed'] for r in rounds)} failed), median "
                  f"matchmaking {statistics.median(matchmaking) if matchmaking else float('nan'):.2f} s, median "
                  f"all-reduce {statistics.median(allreduce) if allreduce else float('nan'):.2f} s")  # fmt: skip
    for report in reports:
        ends = [record["end"] for record in report["epochs"]]
        print(f"peer {report['index']}{' (client)' if report['client_mode'] else ''}: reached epoch "
              f"{report['epochs'][-1]['epoch'] if ends else 0}, last epoch at {ends[-1] if ends else 0:.2f} s, "
              f"peak RSS {max((r['rss'] for r in report['epochs']), default=float('nan')):.0f} MiB, "
              f"final PSS {report['pss']:.0f} MiB "
              f"(with child processes), saw the swarm after {report['joined']:.1f} s, "
              f"step errors {report['failures']}")  # fmt: skip
    ends = [record["end"] for record in first]
    per_epoch = (ends[-1] - ends[0]) / (len(ends) - 1) if len(ends) > 1 else float("nan")
    print(f"seconds per epoch (epochs 2..{first[-1]['epoch'] if first else 0}): {per_epoch:.2f}")
    final = first[-1]["accuracy"] if first else float("nan")
    print(f"final accuracy: collaborative {final:.3f}, local {local[-1]:.3f}")
    if args.json:
        figures = dict(seconds_per_epoch=per_epoch, final_accuracy=final, local_final_accuracy=local[-1],
                       peak_rss_mib=max(r["rss"] for rep in reports for r in rep["epochs"]))  # fmt: skip
        print(json.dumps(figures))


if __name__ == "__main__":
    os.environ.setdefault("HIVEMIND_LOGLEVEL", "WARNING")
    main()
