"""Chaos test of hivemind.Optimizer: trainers of one run are killed, frozen and replaced by late joiners.

    python benchmarks/chaos_optimizer.py                          # the three settings, ~4 min each
    python benchmarks/chaos_optimizer.py --settings delayed --trainers 4 --duration 300

Each trainer is a process of its own (in a session of its own, with its DHT, averagers and p2pd below it and a
private TMPDIR) that trains a small MLP (16-32-32-1) on a synthetic regression task (targets from a fixed random
"teacher" MLP plus noise, generated in the script) with ``hivemind.Optimizer`` and Adam. The first trainers start
from the same initial parameters; every later one (a replacement of a killed trainer) starts from other random
parameters and calls ``load_state_from_peers()`` before training, as a late joiner should.

Settings (``--settings``, comma-separated):

- ``sync``: gradient averaging, optimizer step and gradient round in the training thread;
- ``delayed``: gradient averaging with ``delay_optimizer_step`` and ``delay_grad_averaging``;
- ``delayed_step``: gradient averaging with ``delay_optimizer_step`` only (not run by default);
- ``local``: ``use_local_updates=True`` (local Adam steps, parameters averaged at each epoch).

The chaos driver acts every ``--chaos_every`` seconds on one random trainer (at least ``--min_untouched`` left
alone): ``crash`` (SIGKILL to the trainer's process group, a late joiner replaces it after ``--restart_delay``),
``kill_main`` (SIGKILL to the trainer's main process only: its children must exit by themselves within
``--orphan_grace`` seconds, else they are counted as leaked) and ``freeze`` (SIGSTOP to its process group for
``--min_freeze``..``--max_freeze`` seconds, then SIGCONT). The last ``--calm`` seconds are free of chaos.

Per trainer it reports: the epochs it went through, the duration of its ``step()`` calls (a call longer than
``averaging_timeout`` + ``matchmaking_time`` + ``--hang_slack`` is a **hang**; a watchdog thread in the trainer dumps
its stacks into its log), how far behind the swarm's highest epoch it stays (**lost**: still behind by 2+ epochs at the
end of the calm tail), loss (finite, and its mean over the last epochs against the first), parameters finite,
late joiners' state after ``load_state_from_peers`` (epoch loaded against the swarm's, distance of its parameters
to the other trainers' parameters of that epoch, in units of one epoch's change), the most frequent warnings, leaked
processes, files left in the private TMPDIRs and p2pd sockets after exit, and memory over time (USS: memory that
its processes do not share).
"""

import argparse
import faulthandler
import os
import random
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from typing import Dict, List, Optional

from chaos_common import (
    close_all,
    drive,
    family,
    json_records,
    kill,
    make_emit,
    measure,
    run_chaos,
    spawn,
    wait_for_eof,
)
from chaos_optimizer_report import report

DIM, HIDDEN = 16, 32
SETTINGS = {
    "sync": dict(),
    "delayed": dict(delay_optimizer_step=True, delay_grad_averaging=True),
    "delayed_step": dict(delay_optimizer_step=True),
    "local": dict(use_local_updates=True),
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", default="sync,delayed,local", help=f"comma-separated, of {list(SETTINGS)}")
    parser.add_argument("--trainers", type=int, default=4, help="trainers running at a time")
    parser.add_argument("--duration", type=float, default=240, help="seconds per setting, the calm tail included")
    parser.add_argument("--calm", type=float, default=60, help="seconds without chaos at the end")
    parser.add_argument("--chaos_every", type=float, default=20, help="mean seconds between two chaos actions")
    parser.add_argument("--actions", default="crash,kill_main,freeze", help="comma-separated chaos actions")
    parser.add_argument("--min_freeze", type=float, default=5, help="seconds")
    parser.add_argument("--max_freeze", type=float, default=30, help="seconds")
    parser.add_argument("--restart_delay", type=float, default=3, help="seconds from a kill to its late joiner")
    parser.add_argument("--min_untouched", type=int, default=2, help="trainers the driver leaves alone at any time")
    parser.add_argument("--target_batch_size", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=16, help="samples per local step")
    parser.add_argument("--step_time", type=float, default=0.05, help="seconds of simulated compute per step")
    parser.add_argument("--matchmaking_time", type=float, default=2.0)
    parser.add_argument("--averaging_timeout", type=float, default=10.0)
    parser.add_argument("--hang_slack", type=float, default=10.0, help="seconds past the timeouts = hung")
    parser.add_argument("--orphan_grace", type=float, default=15.0, help="seconds for orphans to exit")
    parser.add_argument("--rss_every", type=float, default=5.0, help="seconds between memory samples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None, help="where logs go (default: a temp dir)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--setting", default="sync", help=argparse.SUPPRESS)
    parser.add_argument("--label", default="", help=argparse.SUPPRESS)
    parser.add_argument("--late", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--verbose", action="store_true", help="the trainers' status lines in their logs")
    parser.add_argument("--initial_peers", default="", help=argparse.SUPPRESS)
    return parser.parse_args()


# ---------------------------------------------------------------------------------------------------- the trainers


def make_model(seed: int):
    import torch

    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(DIM, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, HIDDEN), torch.nn.Tanh(),
        torch.nn.Linear(HIDDEN, 1),
    )  # fmt: skip


def make_batch(teacher, generator, size: int):
    import torch

    x = torch.randn(size, DIM, generator=generator)
    with torch.no_grad():
        y = teacher(x) + 0.01 * torch.randn(size, 1, generator=generator)
    return x, y


def flat_parameters(model) -> List[float]:
    import torch

    with torch.no_grad():
        return [round(v, 7) for v in torch.cat([p.reshape(-1) for p in model.parameters()]).tolist()]


class Watchdog(threading.Thread):
    """Dumps the trainer's stacks into its log when one step() call lasts longer than ``limit`` seconds."""

    def __init__(self, limit: float, emit):
        super().__init__(daemon=True)
        self.limit, self.emit, self.started_at, self.dumped = limit, emit, None, False

    def run(self) -> None:
        while True:
            time.sleep(1.0)
            started = self.started_at
            if started is not None and not self.dumped and time.monotonic() - started > self.limit:
                self.dumped = True
                self.emit(event="hang", seconds=time.monotonic() - started)
                faulthandler.dump_traceback(all_threads=True)


def run_worker(args: argparse.Namespace) -> None:
    import torch

    import hivemind

    torch.set_num_threads(1)
    emit = make_emit(threading.Lock())
    dht = hivemind.DHT(initial_peers=args.initial_peers.split(","), start=True)
    model = make_model(seed=1000 + os.getpid() if args.late else 0)
    teacher = make_model(seed=12345)
    generator = torch.Generator().manual_seed(hash(args.label) % 2**31)
    opt = hivemind.Optimizer(
        dht=dht, run_id="chaos_opt", target_batch_size=args.target_batch_size, batch_size_per_step=args.batch_size,
        optimizer=lambda params: torch.optim.Adam(params, lr=3e-3), params=model.parameters(),
        matchmaking_time=args.matchmaking_time, averaging_timeout=args.averaging_timeout,
        load_state_timeout=60.0, averager_opts=dict(request_timeout=1.0), verbose=args.verbose,
        **SETTINGS[args.setting],
    )  # fmt: skip
    stop = threading.Event()
    threading.Thread(target=wait_for_eof, args=(stop,), daemon=True).start()
    watchdog = Watchdog(args.averaging_timeout + args.matchmaking_time + args.hang_slack, emit)
    watchdog.start()
    emit(event="ready", pid=os.getpid(), peer_id=str(dht.peer_id))
    if args.late:
        started = time.monotonic()
        opt.load_state_from_peers()
        emit(
            event="loaded", seconds=time.monotonic() - started, epoch=opt.local_epoch,
            swarm_epoch=opt.tracker.global_progress.epoch, params=flat_parameters(model),
        )  # fmt: skip
    epoch, losses, step_times = opt.local_epoch, [], []
    while not stop.is_set():
        x, y = make_batch(teacher, generator, args.batch_size)
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        time.sleep(args.step_time)
        watchdog.started_at = started = time.monotonic()
        opt.step()
        watchdog.started_at, seconds = None, time.monotonic() - started
        watchdog.dumped = False
        losses.append(loss.item())
        step_times.append(seconds)
        if opt.local_epoch != epoch:
            finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
            emit(
                event="epoch", epoch=opt.local_epoch, previous=epoch, time=time.time(), step_seconds=seconds,
                max_accumulate_seconds=max(step_times[:-1], default=0.0), steps=len(losses),
                loss=statistics.mean(losses), params_finite=finite, params=flat_parameters(model),
                swarm_epoch=opt.tracker.global_progress.epoch,
            )  # fmt: skip
            epoch, losses, step_times = opt.local_epoch, [], []
    opt.shutdown()
    dht.shutdown()
    emit(event="exit")


# ---------------------------------------------------------------------------------------------------- the driver


class Trainer:
    def __init__(self, label: str, late: bool, process, log_path: str, tmpdir: str):
        self.label, self.late, self.process, self.log_path, self.tmpdir = label, late, process, log_path, tmpdir
        self.started = time.time()
        self.ready_at: Optional[float] = None
        self.alive, self.frozen, self.killed = True, False, False
        self.epochs: List[dict] = []
        self.loaded: Optional[dict] = None
        self.hangs: List[dict] = []
        self.freezes: List[list] = []  # [SIGSTOP time, SIGCONT time or None]
        self.exited_cleanly = False
        self.rss: List[tuple] = []  # (time, python processes' USS, p2pd USS): memory of their own
        self.sockets: set = set()


class Chaos:
    def __init__(self, args: argparse.Namespace, setting: str, workdir: str):
        self.args, self.setting, self.workdir = args, setting, workdir
        self.rng = random.Random(args.seed)
        self.lock = threading.Lock()
        self.trainers: Dict[str, Trainer] = {}
        self.events: List[tuple] = []
        self.leaked: List[str] = []
        self.counter = itertools_count()

    def start_trainer(self, late: bool) -> Trainer:
        label = f"t{next(self.counter)}"
        log_path = os.path.join(self.workdir, f"{label}.log")
        tmpdir = os.path.join(self.workdir, "tmp", label)
        os.makedirs(tmpdir)
        command = [sys.executable, os.path.abspath(__file__), "--worker", "--label", label, "--setting", self.setting]
        command += ["--initial_peers", ",".join(self.initial_peers)] + (["--late"] if late else [])
        for option in ("target_batch_size", "batch_size", "step_time", "matchmaking_time", "averaging_timeout"):
            command += [f"--{option}", str(getattr(self.args, option))]
        command += ["--hang_slack", str(self.args.hang_slack)] + (["--verbose"] if self.args.verbose else [])
        env = dict(os.environ, TMPDIR=tmpdir, PYTHONFAULTHANDLER="1")
        trainer = Trainer(label, late, spawn(command, log_path, env), log_path, tmpdir)
        with self.lock:
            self.trainers[label] = trainer
        threading.Thread(target=self.read_reports, args=(trainer,), daemon=True).start()
        return trainer

    def read_reports(self, trainer: Trainer) -> None:
        for record in json_records(trainer.process):
            with self.lock:
                if record["event"] == "ready":
                    trainer.ready_at = time.time()
                elif record["event"] == "loaded":
                    record["time"] = time.time()
                    trainer.loaded = record
                elif record["event"] == "epoch":
                    trainer.epochs.append(record)
                elif record["event"] == "hang":
                    trainer.hangs.append(dict(record, time=time.time()))
                elif record["event"] == "exit":
                    trainer.exited_cleanly = True

    def living(self) -> List[Trainer]:
        return [trainer for trainer in self.trainers.values() if trainer.alive]

    def act(self) -> None:
        candidates = [t for t in self.living() if not t.frozen and t.ready_at is not None]
        if len(candidates) <= self.args.min_untouched:
            return
        trainer = self.rng.choice(candidates)
        action = self.rng.choice(self.args.actions.split(","))
        self.events.append((time.time(), action, trainer.label))
        if action == "freeze":
            trainer.frozen = True
            trainer.freezes.append([time.time(), None])
            os.killpg(trainer.process.pid, signal.SIGSTOP)
            seconds = self.rng.uniform(self.args.min_freeze, self.args.max_freeze)
            threading.Timer(seconds, self.thaw, args=(trainer,)).start()
            return
        trainer.alive, trainer.killed = False, True
        grace = self.args.orphan_grace
        note = f"alive {grace} s after its parent died"
        kill(trainer.label, trainer.process, action == "crash", grace, self.leaked, note)
        threading.Timer(self.args.restart_delay, self.start_trainer, args=(True,)).start()

    def thaw(self, trainer: Trainer) -> None:
        if trainer.alive:
            os.killpg(trainer.process.pid, signal.SIGCONT)
        trainer.frozen = False
        trainer.freezes[-1][1] = time.time()
        self.events.append((time.time(), "thaw", trainer.label))

    def sample(self) -> None:
        for trainer in self.living():
            python_rss, p2pd_rss, sockets = measure(family(trainer.process.pid), own_memory=True)
            trainer.sockets.update(sockets)
            if python_rss:
                trainer.rss.append((time.time(), python_rss, p2pd_rss))

    def run(self) -> None:
        from hivemind import DHT

        bootstrap = DHT(start=True)
        self.initial_peers = [str(maddr) for maddr in bootstrap.get_visible_maddrs()]
        self.started = time.time()
        self.chaos_ended = self.started + self.args.duration - self.args.calm
        for _ in range(self.args.trainers):
            self.start_trainer(late=False)
        until, first_action = self.started + self.args.duration, self.started + self.args.chaos_every
        drive(self.lock, self.rng, self.args, until, self.chaos_ended, first_action, self.act, self.sample)
        self.ended = time.time()
        self.finish()
        bootstrap.shutdown()

    def finish(self) -> None:
        close_all(self.living(), self.args.averaging_timeout + self.args.hang_slack + 20, self.leaked)
        for trainer in self.living():
            for process in family(trainer.process.pid)[1:]:
                self.leaked.append(f"{trainer.label}: {process.name()} (pid {process.pid}) alive after shutdown")
        time.sleep(1)
        self.files_left = {}
        for trainer in self.trainers.values():
            left = [os.path.join(trainer.tmpdir, name) for name in os.listdir(trainer.tmpdir)]
            left = [path for path in left if not os.path.basename(path).startswith("torchinductor_")]  # torch's
            left += [path for path in trainer.sockets if os.path.exists(path)]
            self.files_left[trainer.label] = left


def itertools_count():
    number = 0
    while True:
        yield number
        number += 1


def records_of(chaos: Chaos) -> dict:
    trainers = {
        t.label: dict(epochs=t.epochs, loaded=t.loaded, hangs=t.hangs, freezes=t.freezes)
        for t in chaos.trainers.values()
    }
    return dict(events=chaos.events, trainers=trainers)


def main() -> None:
    args = parse_args()
    if args.worker:
        run_worker(args)
        return
    root = args.workdir or tempfile.mkdtemp(prefix="chaos_optimizer_")
    totals = {}
    for setting in args.settings.split(","):
        workdir = os.path.join(root, setting)
        shutil.rmtree(workdir, ignore_errors=True)
        os.makedirs(workdir)
        chaos = Chaos(args, setting, workdir)
        run_chaos(chaos, chaos.trainers, records_of)
        totals[setting] = report(chaos, SETTINGS)
    print(f"\nall settings: {totals}")


if __name__ == "__main__":
    main()
