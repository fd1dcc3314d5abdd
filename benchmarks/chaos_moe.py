"""Churn test of a decentralized mixture-of-experts: expert servers are killed, frozen and restarted under training.

    python benchmarks/chaos_moe.py                                   # the three settings, ~11 minutes
    python benchmarks/chaos_moe.py --settings masked --duration 120  # one setting, shorter

Settings: ``masked`` (one trainer, allow_zero_outputs=True), ``strict2`` (two trainers, allow_zero_outputs=False),
``long`` (one trainer, allow_zero_outputs=False, one server down for half the run and another frozen for 30% of it,
instead of the short-outage schedule); forward_timeout = backward_timeout = 2 s in all.

A bootstrap DHT runs in this (driver) process; ``--servers`` expert servers (``ffn`` experts of ``--hidden_dim``,
``--experts_per_server`` (2) per server on a ``servers x experts_per_server`` grid) run as separate processes, each
with its own DHT joined to the bootstrap one; ``--trainers`` trainer processes train a RemoteMixtureOfExperts
(``k_best=4``) on synthetic regression data.
Meanwhile the driver follows a fixed schedule (scaled to ``--duration``): it SIGKILLs a server's whole process group
(python, DHT process, p2pd), restarts it on the same identity and port, SIGSTOPs another one for a while and SIGCONTs
it, kills a server and restarts it with a new identity, kills two at once, and (with two trainers) SIGKILLs a
trainer in the middle of its requests and starts it again.

Every trainer step is logged: its duration, how many distinct experts answered, whether the loss and the trainer's
parameters are finite, and the error if the step raised. The table then shows per setting: step time percentiles,
"hangs" (steps longer than forward_timeout + backward_timeout + --slack), steps that raised (by message), non-finite
losses or parameters, experts answering per step, for each restart the seconds from the moment the new server was
ready until each trainer's first step that an expert of it answered, and the servers' RSS (first and last sample of
each server incarnation). Logs stay in --workdir (a temporary directory by default).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import psutil
from chaos_common import MIB, family, kill_all, wait_or_kill

SETTINGS = {
    # name: (trainers, allow_zero_outputs, forward_timeout, backward_timeout); "long" runs the long-outage schedule
    "masked": (1, True, 2.0, 2.0),
    "strict2": (2, False, 2.0, 2.0),
    "long": (1, False, 2.0, 2.0),
}


# ------------------------------------------------------------------ server process


def run_server(args) -> None:
    import torch

    from hivemind.moe import Server

    torch.set_num_threads(1)
    uids = [f"ffn.{args.index}.{j}" for j in range(args.experts_per_server)]
    server = Server.create(
        expert_uids=uids,
        expert_cls="ffn",
        hidden_dim=args.hidden_dim,
        initial_peers=[args.bootstrap],
        host_maddrs=[f"/ip4/127.0.0.1/tcp/{args.port}"],
        identity_path=args.identity,
        update_period=args.update_period,
        start=True,
    )
    ready = {"time": time.time(), "peer_id": str(server.dht.peer_id), "uids": uids}
    with open(args.ready_file + ".tmp", "w") as f:
        json.dump(ready, f)
    os.replace(args.ready_file + ".tmp", args.ready_file)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    server.shutdown()


# ------------------------------------------------------------------ trainer process


def run_trainer(args) -> None:
    import torch

    from hivemind.dht import DHT
    from hivemind.moe import RemoteMixtureOfExperts

    torch.set_num_threads(1)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))

    class RecordingMixture(RemoteMixtureOfExperts):
        """Remembers which experts answered in the last forward (the mixture's alive mask)."""

        answered: set = set()

        def call_experts(self, chosen_experts, deadline, *inputs, **kwargs):
            self.answered = set()
            mask, outputs = super().call_experts(chosen_experts, deadline, *inputs, **kwargs)
            for sample, experts in enumerate(chosen_experts):
                for slot, expert in enumerate(experts):
                    if mask[sample, slot]:
                        self.answered.add(f"{expert.uid}@{expert.peer_id}")
            return mask, outputs

    dht = DHT(initial_peers=[args.bootstrap], host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True)
    moe = RecordingMixture(
        dht=dht,
        uid_prefix="ffn.",
        grid_size=(args.servers, args.experts_per_server),
        in_features=args.hidden_dim,
        k_best=4,
        forward_timeout=args.forward_timeout,
        backward_timeout=args.backward_timeout,
        allow_zero_outputs=args.allow_zero_outputs,
    )
    optimizer = torch.optim.Adam(moe.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(args.index)
    teacher = torch.randn(args.hidden_dim, args.hidden_dim, generator=generator) / args.hidden_dim**0.5
    with open(args.log_file, "a", buffering=1) as log:
        step = 0
        while not stop:
            x = torch.randn(args.batch_size, args.hidden_dim, generator=generator)
            started, wall, error, loss_value = time.monotonic(), time.time(), None, None
            moe.answered = set()
            try:
                loss = (moe(x) - x @ teacher).pow(2).mean()
                loss_value = loss.item()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            except Exception as e:  # recorded: a step that raises is a result of the test
                error = f"{type(e).__name__}: {e}"[:160]
            record = dict(
                step=step,
                wall=wall,
                dt=time.monotonic() - started,
                answered=sorted(moe.answered),
                loss=loss_value,
                loss_finite=loss_value is not None and loss_value == loss_value and abs(loss_value) != float("inf"),
                params_finite=all(bool(torch.isfinite(p).all()) for p in moe.parameters()),
                error=error,
            )
            log.write(json.dumps(record) + "\n")
            step += 1
            time.sleep(args.step_interval)
    dht.shutdown()


# ------------------------------------------------------------------ driver


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree_rss(pid: int) -> Optional[int]:
    try:
        return sum(p.memory_info().rss for p in family(pid)) or None
    except psutil.NoSuchProcess:
        return None


@dataclass
class Incarnation:
    server: int
    popen: subprocess.Popen
    ready_file: str
    how: str  # "start", "same identity+port", "new identity"
    started: float = field(default_factory=time.time)
    ready: Optional[dict] = None
    rss: List[int] = field(default_factory=list)


class Driver:
    def __init__(self, args, setting: str, workdir: str):
        from hivemind.dht import DHT

        self.args, self.setting, self.workdir = args, setting, workdir
        self.trainers_count, self.allow_zero, self.fwd, self.bwd = SETTINGS[setting]
        self.bootstrap = DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
        self.bootstrap_maddr = str(self.bootstrap.get_visible_maddrs()[0])
        self.ports = [free_port() for _ in range(args.servers)]
        self.identities = [os.path.join(workdir, f"{setting}-server{i}.key") for i in range(args.servers)]
        self.servers: Dict[int, Incarnation] = {}
        self.incarnations: List[Incarnation] = []
        self.trainers: Dict[int, subprocess.Popen] = {}
        self.events: List[tuple] = []
        self.t0 = time.time()

    def _spawn(self, role_args: List[str], log_name: str) -> subprocess.Popen:
        log = open(os.path.join(self.workdir, log_name), "a")
        command = [sys.executable, os.path.abspath(__file__), *role_args, "--bootstrap", self.bootstrap_maddr]
        command += ["--hidden_dim", str(self.args.hidden_dim), "--servers", str(self.args.servers)]
        command += ["--experts_per_server", str(self.args.experts_per_server)]
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def start_server(self, index: int, how: str) -> None:
        port, identity = self.ports[index], self.identities[index]
        if how == "new identity":
            port, identity = 0, os.path.join(self.workdir, f"{self.setting}-server{index}-{time.time():.0f}.key")
        ready_file = os.path.join(self.workdir, f"{self.setting}-server{index}-{len(self.incarnations)}.ready")
        role = ["--role", "server", "--index", str(index), "--port", str(port), "--identity", identity]
        role += ["--ready_file", ready_file, "--update_period", str(self.args.update_period)]
        popen = self._spawn(role, f"{self.setting}-server{index}.log")
        incarnation = Incarnation(index, popen, ready_file, how)
        self.servers[index] = incarnation
        self.incarnations.append(incarnation)
        self.event(f"start server {index} ({how})")

    def start_trainer(self, index: int) -> None:
        role = ["--role", "trainer", "--index", str(index), "--log_file", self.trainer_log(index)]
        role += ["--forward_timeout", str(self.fwd), "--backward_timeout", str(self.bwd)]
        role += ["--batch_size", str(self.args.batch_size), "--step_interval", str(self.args.step_interval)]
        if self.allow_zero:
            role.append("--allow_zero_outputs")
        self.trainers[index] = self._spawn(role, f"{self.setting}-trainer{index}.out")
        self.event(f"start trainer {index}")

    def trainer_log(self, index: int) -> str:
        return os.path.join(self.workdir, f"{self.setting}-trainer{index}.jsonl")

    def event(self, what: str) -> None:
        self.events.append((time.time(), what))
        with open(os.path.join(self.workdir, f"{self.setting}-events.jsonl"), "a") as f:
            f.write(json.dumps(dict(wall=time.time(), event=what)) + "\n")
        print(f"  [{self.setting} +{time.time() - self.t0:6.1f}s] {what}", flush=True)

    def signal_server(self, index: int, sig: int, what: str) -> None:
        try:
            os.killpg(self.servers[index].popen.pid, sig)
        except ProcessLookupError:
            pass
        if sig == signal.SIGKILL:
            self.servers[index].popen.wait()
        self.event(f"{what} server {index}")

    def kill_trainer(self, index: int) -> None:
        os.killpg(self.trainers[index].pid, signal.SIGKILL)
        self.trainers[index].wait()
        self.event(f"SIGKILL trainer {index} (mid-step)")

    def poll(self) -> None:
        for incarnation in self.servers.values():
            if incarnation.ready is None and os.path.exists(incarnation.ready_file):
                with open(incarnation.ready_file) as f:
                    incarnation.ready = json.load(f)
                delay = incarnation.ready["time"] - incarnation.started
                self.event(f"server {incarnation.server} ready ({incarnation.how}) after {delay:.1f}s")
            if incarnation.popen.poll() is None:
                status = psutil.Process(incarnation.popen.pid).status()
                if status != psutil.STATUS_STOPPED:
                    rss = tree_rss(incarnation.popen.pid)
                    if rss is not None and incarnation.ready is not None:
                        incarnation.rss.append(rss)

    def wait_until(self, moment: float) -> None:
        while time.time() < self.t0 + moment:
            self.poll()
            time.sleep(0.25)

    def run(self) -> dict:
        duration, n = self.args.duration, self.args.servers
        for index in range(n):
            self.start_server(index, "start")
        deadline = time.time() + 120
        while not all(s.ready for s in self.servers.values()):
            assert time.time() < deadline, f"servers did not start in 120 s; see the logs in {self.workdir}"
            self.poll()
            time.sleep(0.25)
        self.t0 = time.time()
        for index in range(self.trainers_count):
            self.start_trainer(index)

        def at(fraction):
            return fraction * duration

        schedule = self.long_schedule(at) if self.setting == "long" else self.churn_schedule(at, n)
        if self.trainers_count > 1:
            schedule += [
                (at(0.52), lambda: self.kill_trainer(1)),
                (at(0.54), lambda: self.start_trainer(1)),
            ]
        for moment, action in sorted(schedule, key=lambda item: item[0]):
            self.wait_until(moment)
            action()
        self.wait_until(duration)
        self.stop_all()
        return self.summarize()

    def long_schedule(self, at) -> list:
        """One server down for half the run (restarted on its identity and port), another frozen for 30% of it."""
        return [
            (at(0.05), lambda: self.signal_server(0, signal.SIGKILL, "SIGKILL")),
            (at(0.10), lambda: self.signal_server(1, signal.SIGSTOP, "SIGSTOP")),
            (at(0.40), lambda: self.signal_server(1, signal.SIGCONT, "SIGCONT")),
            (at(0.55), lambda: self.start_server(0, "same identity+port")),
        ]

    def churn_schedule(self, at, n: int) -> list:
        """Short outages: kills, restarts on the same or a new identity, a freeze, two servers down at once."""
        return [
            (at(0.08), lambda: self.signal_server(0, signal.SIGKILL, "SIGKILL")),
            (at(0.18), lambda: self.start_server(0, "same identity+port")),
            (at(0.28), lambda: self.signal_server(1, signal.SIGSTOP, "SIGSTOP")),
            (at(0.40), lambda: self.signal_server(1, signal.SIGCONT, "SIGCONT")),
            (at(0.45), lambda: self.signal_server(2 % n, signal.SIGKILL, "SIGKILL")),
            (at(0.48), lambda: self.start_server(2 % n, "new identity")),
            (at(0.58), lambda: self.signal_server(3 % n, signal.SIGKILL, "SIGKILL")),
            (at(0.58), lambda: self.signal_server(0, signal.SIGKILL, "SIGKILL")),
            (at(0.68), lambda: self.start_server(3 % n, "same identity+port")),
            (at(0.68), lambda: self.start_server(0, "same identity+port")),
        ]

    def stop_all(self) -> None:
        self.event("stop")
        for popen in self.trainers.values():
            popen.send_signal(signal.SIGTERM)
        for popen in self.trainers.values():
            wait_or_kill(popen, 30)
        for incarnation in self.servers.values():
            if incarnation.popen.poll() is None:
                incarnation.popen.send_signal(signal.SIGTERM)
        for incarnation in self.servers.values():
            wait_or_kill(incarnation.popen, 30)
        self.bootstrap.shutdown()

    # ------------------------------------------------------------------ results

    def summarize(self) -> dict:
        slack, limit = self.args.slack, self.fwd + self.bwd + self.args.slack
        steps = []
        for index in range(self.trainers_count):
            with open(self.trainer_log(index)) as f:
                steps += [dict(json.loads(line), trainer=index) for line in f if line.strip()]
        times = sorted(s["dt"] for s in steps) or [0.0]
        errors = collections.Counter(_error_kind(s["error"]) for s in steps if s["error"])
        reuse = []
        for incarnation in self.incarnations:
            if incarnation.how == "start" or incarnation.ready is None:
                continue
            keys = {f"{uid}@{incarnation.ready['peer_id']}" for uid in incarnation.ready["uids"]}
            ready_at = incarnation.ready["time"]
            per_trainer = []
            for index in range(self.trainers_count):
                later = [s for s in steps if s["trainer"] == index and s["wall"] >= ready_at]
                first = next((s for s in later if keys & set(s["answered"])), None)
                per_trainer.append(None if first is None else first["wall"] + first["dt"] - ready_at)
            restart_delay = incarnation.ready["time"] - incarnation.started
            reuse.append((incarnation.server, incarnation.how, restart_delay, per_trainer))
        rss = [(i.server, i.how, i.rss[0], i.rss[-1]) for i in self.incarnations if i.rss]
        answered = [len(s["answered"]) for s in steps if not s["error"]]
        return dict(
            setting=self.setting,
            trainers=self.trainers_count,
            allow_zero=self.allow_zero,
            timeouts=(self.fwd, self.bwd),
            steps=len(steps),
            p50=statistics.median(times),
            p95=times[int(0.95 * (len(times) - 1))],
            max=times[-1],
            hangs=sum(s["dt"] > limit for s in steps),
            timeout_waits=sum(s["dt"] >= 0.95 * min(self.fwd, self.bwd) for s in steps),
            limit=limit,
            slack=slack,
            errors=errors,
            nonfinite_loss=sum(1 for s in steps if s["loss"] is not None and not s["loss_finite"]),
            nonfinite_params=sum(1 for s in steps if not s["params_finite"]),
            answered_mean=statistics.mean(answered) if answered else 0.0,
            answered_min=min(answered, default=0),
            reuse=reuse,
            rss=rss,
            workdir=self.workdir,
        )


def _error_kind(error: str) -> str:
    return re.sub(r"\d+(\.\d+)?", "N", error.split(";")[0])[:100]


def print_table(results: List[dict]) -> None:
    print()
    print(
        "| setting | trainers | allow_zero | fwd/bwd timeout | steps | step p50 / p95 / max (s) | hangs > limit |"
        " steps >= a timeout | steps that raised | NaN loss / params | experts answering (mean, min) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        raised = sum(r["errors"].values())
        print(
            f"| {r['setting']} | {r['trainers']} | {r['allow_zero']} | {r['timeouts'][0]:g}/{r['timeouts'][1]:g} s |"
            f" {r['steps']} | {r['p50']:.2f} / {r['p95']:.2f} / {r['max']:.2f} | {r['hangs']} (> {r['limit']:g} s) |"
            f" {r['timeout_waits']} | {raised} | {r['nonfinite_loss']} / {r['nonfinite_params']} |"
            f" {r['answered_mean']:.1f}, {r['answered_min']} |"
        )
    print()
    print("| setting | restarted server | how | start-up (s) | ready -> first answer in each trainer (s) |")
    print("|---|---|---|---|---|")
    for r in results:
        for server, how, delay, per_trainer in r["reuse"]:
            cells = ", ".join("never" if t is None else f"{t:.1f}" for t in per_trainer)
            print(f"| {r['setting']} | {server} | {how} | {delay:.1f} | {cells} |")
    print()
    print("| setting | errors (count: first words) |")
    print("|---|---|")
    for r in results:
        for kind, count in r["errors"].most_common(6):
            print(f"| {r['setting']} | {count}: `{kind}` |")
    print()
    print("| setting | server | incarnation | RSS first -> last sample (MiB) |")
    print("|---|---|---|---|")
    for r in results:
        for server, how, first, last in r["rss"]:
            print(f"| {r['setting']} | {server} | {how} | {first / MIB:.0f} -> {last / MIB:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--duration", type=float, default=180, help="seconds of chaos per setting")
    parser.add_argument("--servers", type=int, default=4)
    parser.add_argument("--experts_per_server", type=int, default=2, help="the grid is servers x this")
    parser.add_argument("--hidden_dim", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--step_interval", type=float, default=0.1, help="trainer pause between steps (s)")
    parser.add_argument("--update_period", type=float, default=10, help="servers' DHT announcement period (s)")
    parser.add_argument("--slack", type=float, default=2.0, help="a step longer than fwd+bwd timeout+slack hangs")
    parser.add_argument("--workdir", default=None)
    # roles of the child processes
    parser.add_argument("--role", choices=["driver", "server", "trainer"], default="driver")
    parser.add_argument("--index", type=int, default=0)
    parser.add_argument("--bootstrap", default=None)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--identity", default=None)
    parser.add_argument("--ready_file", default=None)
    parser.add_argument("--log_file", default=None)
    parser.add_argument("--forward_timeout", type=float, default=2.0)
    parser.add_argument("--backward_timeout", type=float, default=2.0)
    parser.add_argument("--allow_zero_outputs", action="store_true")
    args = parser.parse_args()
    if args.role == "server":
        return run_server(args)
    if args.role == "trainer":
        return run_trainer(args)
    assert args.servers >= 2, "the schedule needs at least 2 servers"
    workdir = args.workdir or tempfile.mkdtemp(prefix="chaos_moe-")
    os.makedirs(workdir, exist_ok=True)
    print(f"logs in {workdir}; load before: {os.getloadavg()}", flush=True)
    results = []
    for setting in args.settings:
        driver = Driver(args, setting, workdir)
        try:
            results.append(driver.run())
        finally:
            kill_all(incarnation.popen for incarnation in driver.incarnations)
            kill_all(driver.trainers.values())
    print(f"load after: {os.getloadavg()}")
    print_table(results)


if __name__ == "__main__":
    main()
