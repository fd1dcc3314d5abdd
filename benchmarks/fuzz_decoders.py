"""Fuzz every decoder that reads network bytes; print target, inputs tried, crashes, hangs and refusal types.

Targets are defined in benchmarks/fuzz_targets.py (tensors and each codec, msgpack values, DictionaryDHTValue, DHT
store requests and find responses, stream framing, the p2pd control channel, shared-memory pipe records). Inputs come
from hypothesis strategies (random bytes, mutated valid encodings, structured messages with boundary values).

Each run of targets happens in a child process, so a segfault (or a C stack overflow) is counted as a crash of the
target that was running instead of killing this script; a watchdog kills a child that made no progress for
``--hang-seconds`` (a hang) or whose memory grew past ``--max-rss-mb`` (counted as a crash). The child also caps
its own address space at start-up size + ``--max-alloc-mb``, so a decoder that allocates what a header announces
fails with MemoryError, which is a finding like any exception that is not the target's own. After a crash or hang
the child is restarted (new seed) for the rest of that target's time.

The input that caused each finding is written to ``--findings-dir`` (with its traceback); replay it with
``python benchmarks/fuzz_decoders.py --reproduce TARGET FILE``.

    python benchmarks/fuzz_decoders.py                                   # every target for 600 s
    python benchmarks/fuzz_decoders.py --seconds-per-target 20 --targets msgpack stream_framing
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from typing import Dict, List, Optional

import psutil

HERE = os.path.dirname(os.path.abspath(__file__))
MAX_RESTARTS_PER_TARGET = 5
PROGRESS_INTERVAL = 0.5  # s between progress reports of the child
BATCH_EXAMPLES = 500  # hypothesis examples per @given run (each run gets its own seed)


# --------------------------------------------------------------------------------------------------------- child


def _origin(error: BaseException) -> str:
    frames = traceback.extract_tb(error.__traceback__)
    if not frames:
        return "?"
    frame = frames[-1]
    return f"{os.path.basename(frame.filename)}:{frame.lineno} {frame.name}"


class _Child:
    """Runs targets one after another, reporting JSON lines on ``report``."""

    def __init__(self, report, findings_dir: str, max_inputs: Optional[int]):
        self.report, self.findings_dir, self.max_inputs = report, findings_dir, max_inputs
        os.makedirs(findings_dir, exist_ok=True)

    def send(self, **event) -> None:
        self.report.write(json.dumps(event) + "\n")
        self.report.flush()

    def run_target(self, target, seconds: float, seed: int) -> None:
        from hypothesis import HealthCheck, Phase, given, settings
        from hypothesis import seed as hypothesis_seed

        current = open(os.path.join(self.findings_dir, f"{target.name}.current"), "wb")
        inputs, refusals, foreign, harness_errors = 0, Counter(), Counter(), Counter()
        saved = set()
        deadline, last_report = time.monotonic() + seconds, 0.0

        class Done(BaseException):
            pass

        def one(data: bytes) -> None:
            nonlocal inputs, last_report
            now = time.monotonic()
            if now > deadline or (self.max_inputs is not None and inputs >= self.max_inputs):
                raise Done
            if now - last_report > PROGRESS_INTERVAL:
                last_report = now
                self.send(target=target.name, inputs=inputs, refusals=refusals, foreign=foreign)
            os.pwrite(current.fileno(), data, 0)
            os.ftruncate(current.fileno(), len(data))
            inputs += 1
            try:
                target.decode(data)
            except target.own as e:
                refusals[type(e).__name__] += 1
            except Exception as e:  # a finding: not the layer's own refusal
                key = f"{type(e).__name__} at {_origin(e)}"
                foreign[key] += 1
                if key not in saved and len(saved) < 20:
                    saved.add(key)
                    stem = os.path.join(self.findings_dir, f"{target.name}-{type(e).__name__}-{len(saved)}")
                    with open(stem + ".bin", "wb") as f:
                        f.write(data)
                    with open(stem + ".txt", "w") as f:
                        f.write(key + "\n" + "".join(traceback.format_exception(e)))

        batch = 0
        while True:
            runner = settings(
                max_examples=BATCH_EXAMPLES,
                deadline=None,
                database=None,
                phases=[Phase.generate],
                suppress_health_check=list(HealthCheck),
                report_multiple_bugs=False,
            )(hypothesis_seed(seed * 100_003 + batch)(given(target.inputs)(one)))
            try:
                runner()
            except Done:
                break
            except Exception as e:  # raised while generating an input: a bug of the fuzz harness, not a finding
                harness_errors[f"{type(e).__name__}: {e}"[:200]] += 1
                if sum(harness_errors.values()) > 100:
                    break
            batch += 1
        current.close()
        self.send(
            target=target.name, inputs=inputs, refusals=refusals, foreign=foreign, harness=harness_errors, done=True
        )


def _limit_address_space(extra_mb: int) -> None:
    import resource

    with open("/proc/self/statm") as f:
        vm_bytes = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    limit = vm_bytes + extra_mb * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))


def child_main(args) -> None:
    import faulthandler

    faulthandler.enable()  # a segfault prints the Python stack to stderr (the parent keeps its tail)
    sys.path.insert(0, HERE)
    import torch

    torch.set_num_threads(1)
    from fuzz_targets import build_targets

    targets = build_targets()
    report = os.fdopen(args.report_fd, "w")
    child = _Child(report, args.findings_dir, args.max_inputs)
    if args.max_alloc_mb:
        _limit_address_space(args.max_alloc_mb)
    for name, seconds in zip(args.child_targets, args.child_seconds):
        child.send(target=name, started=True)
        child.run_target(targets[name], seconds, args.seed)


# --------------------------------------------------------------------------------------------------------- parent


class TargetResult:
    def __init__(self, name: str):
        self.name = name
        self.inputs = self.crashes = self.hangs = 0
        self.refusals: Counter = Counter()
        self.foreign: Counter = Counter()
        self.crash_notes: List[str] = []
        self.harness_errors: Counter = Counter()  # errors of the input generators (fix the harness)
        self.done = False
        self._base_inputs = 0  # inputs of earlier (crashed) children
        self._base_refusals: Counter = Counter()
        self._base_foreign: Counter = Counter()

    def update(self, event: dict) -> None:
        self.inputs = self._base_inputs + event["inputs"]
        self.refusals = self._base_refusals + Counter(event["refusals"])
        self.foreign = self._base_foreign + Counter(event["foreign"])
        self.done = self.done or event.get("done", False)
        self.harness_errors.update(event.get("harness", {}))

    def child_died(self) -> None:
        self._base_inputs, self._base_refusals, self._base_foreign = self.inputs, self.refusals, self.foreign

    def as_dict(self) -> dict:
        return dict(
            target=self.name,
            inputs=self.inputs,
            crashes=self.crashes,
            hangs=self.hangs,
            foreign=dict(self.foreign),
            refusals=dict(self.refusals),
            crash_notes=self.crash_notes,
            harness_errors=dict(self.harness_errors),
        )


def _save_crash(args, result: TargetResult, kind: str, stderr_tail: str) -> str:
    current = os.path.join(args.findings_dir, f"{result.name}.current")
    stem = os.path.join(args.findings_dir, f"{result.name}-{kind}-{result.crashes + result.hangs}")
    if os.path.exists(current):
        os.replace(current, stem + ".bin")
    with open(stem + ".txt", "w") as f:
        f.write(stderr_tail)
    return stem + ".bin"


def run_child(args, names: List[str], seconds: List[float], seed: int, results: Dict[str, TargetResult]) -> None:
    """Run targets in one child; on a crash or hang, record it and return (the caller restarts the rest)."""
    read_fd, write_fd = os.pipe()
    stderr_path = os.path.join(args.findings_dir, "child-stderr.log")
    command = [sys.executable, os.path.abspath(__file__), "--child", "--report-fd", str(write_fd)]
    command += ["--findings-dir", args.findings_dir, "--seed", str(seed), "--max-alloc-mb", str(args.max_alloc_mb)]
    command += ["--child-targets", *names, "--child-seconds", *map(str, seconds)]
    if args.max_inputs is not None:
        command += ["--max-inputs", str(args.max_inputs)]
    with open(stderr_path, "wb") as stderr:
        process = subprocess.Popen(command, pass_fds=(write_fd,), stderr=stderr, stdout=subprocess.DEVNULL)
    os.close(write_fd)
    reader = os.fdopen(read_fd)
    current: Optional[TargetResult] = None
    last_progress, start_grace = time.monotonic(), args.startup_seconds
    problem = None
    try:
        while True:
            ready, _, _ = select.select([reader], [], [], 0.5)
            now = time.monotonic()
            if ready:
                line = reader.readline()
                if not line:
                    break  # the child exited
                event = json.loads(line)
                current = results[event["target"]]
                last_progress, start_grace = now, 0.0
                if not event.get("started"):
                    current.update(event)
                continue
            if process.poll() is not None:
                continue  # drain the pipe until EOF
            if now - last_progress > args.hang_seconds + start_grace:
                problem = "hang"
            else:
                try:
                    rss_mb = psutil.Process(process.pid).memory_info().rss / 2**20
                except psutil.NoSuchProcess:
                    continue
                if rss_mb > args.max_rss_mb:
                    problem = f"memory (RSS {rss_mb:.0f} MiB > {args.max_rss_mb} MiB)"
            if problem:
                process.send_signal(signal.SIGKILL)
                break
    finally:
        reader.close()
        returncode = process.wait()
    if current is None:
        if returncode != 0:
            raise RuntimeError(f"fuzz child failed to start (exit {returncode}); see {stderr_path}")
        return
    if problem is None and returncode == 0:
        return  # every target ran its time
    with open(stderr_path, "rb") as f:
        tail = f.read()[-4000:].decode(errors="replace")
    if problem == "hang":
        current.hangs += 1
        kind = "hang"
    else:
        current.crashes += 1
        kind = "crash"
        problem = problem or f"exit status {returncode}" + (
            f" (signal {signal.Signals(-returncode).name})" if returncode < 0 else ""
        )
    saved = _save_crash(args, current, kind, tail)
    current.crash_notes.append(f"{kind}: {problem}; input saved to {saved}")
    current.child_died()


def run_all(args) -> Dict[str, TargetResult]:
    sys.path.insert(0, HERE)
    results = {name: TargetResult(name) for name in args.targets}
    os.makedirs(args.findings_dir, exist_ok=True)
    pending = list(args.targets)
    budget = {name: float(args.seconds_per_target) for name in pending}
    restarts: Counter = Counter()
    seed = args.seed
    while pending:
        started = {name: time.monotonic() for name in pending}
        run_child(args, pending, [budget[n] for n in pending], seed, results)
        seed += 1
        unfinished = [name for name in pending if not results[name].done]
        if not unfinished:
            break
        failed = unfinished[0]  # the target that was running when the child died
        restarts[failed] += 1
        budget[failed] = max(0.0, budget[failed] - (time.monotonic() - started[failed]))
        if restarts[failed] > MAX_RESTARTS_PER_TARGET or budget[failed] < 1:
            results[failed].crash_notes.append(f"stopped after {restarts[failed]} restarts")
            results[failed].done = True
            unfinished = unfinished[1:]
        pending = unfinished
    return results


def print_table(results: Dict[str, TargetResult]) -> None:
    header = f"{'target':<22} {'inputs':>9} {'crashes':>7} {'hangs':>5} {'foreign':>7}  refusal exception types seen"
    print(header)
    print("-" * len(header))
    for result in results.values():
        refusals = ", ".join(f"{name} x{count}" for name, count in result.refusals.most_common()) or "-"
        print(
            f"{result.name:<22} {result.inputs:>9} {result.crashes:>7} {result.hangs:>5} "
            f"{sum(result.foreign.values()):>7}  {refusals}"
        )
    for result in results.values():
        for key, count in result.foreign.most_common():
            print(f"  FINDING {result.name}: {key} (x{count})")
        for note in result.crash_notes:
            print(f"  FINDING {result.name}: {note}")
        for error, count in result.harness_errors.items():
            print(f"  harness error (not a finding) {result.name}: {error} (x{count})")


def reproduce(target_name: str, path: str) -> None:
    sys.path.insert(0, HERE)
    from fuzz_targets import build_targets

    target = build_targets()[target_name]
    with open(path, "rb") as f:
        data = f.read()
    print(f"{target_name}: {target.about}; {len(data)} bytes of input")
    try:
        target.decode(data)
        print("decoded without an error")
    except target.own as e:
        print(f"refused with the layer's own {type(e).__name__}: {e}")
    except Exception:
        print("FINDING: an exception that is not the layer's own:")
        traceback.print_exc()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds-per-target", type=float, default=600.0)
    parser.add_argument("--targets", nargs="*", help="default: all (see --list)")
    parser.add_argument("--list", action="store_true", help="list the targets and exit")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-inputs", type=int, default=None, help="stop each target after this many inputs")
    parser.add_argument("--hang-seconds", type=float, default=20.0, help="no progress for this long = a hang")
    parser.add_argument("--startup-seconds", type=float, default=60.0, help="extra patience while a child imports")
    parser.add_argument("--max-rss-mb", type=int, default=3072)
    parser.add_argument("--max-alloc-mb", type=int, default=1024, help="address space a child may add (0: no cap)")
    parser.add_argument("--findings-dir", default=os.path.join(tempfile.gettempdir(), "hivemind-fuzz-findings"))
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--reproduce", nargs=2, metavar=("TARGET", "FILE"), help="replay one saved input")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--report-fd", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--child-targets", nargs="*", help=argparse.SUPPRESS)
    parser.add_argument("--child-seconds", nargs="*", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child_main(args)
    if args.reproduce:
        return reproduce(*args.reproduce)
    sys.path.insert(0, HERE)
    from fuzz_targets import build_targets

    all_targets = build_targets()
    if args.list:
        for target in all_targets.values():
            print(f"{target.name:<22} {target.about}\n{'':<22} own refusals: {[t.__name__ for t in target.own]}")
        return
    args.targets = args.targets or list(all_targets)
    unknown = set(args.targets) - set(all_targets)
    if unknown:
        parser.error(f"unknown targets {sorted(unknown)}; --list shows them")
    args.findings_dir = os.path.abspath(args.findings_dir)
    started = time.monotonic()
    results = run_all(args)
    print(
        f"fuzzed {len(results)} targets, {args.seconds_per_target:g} s each, seed {args.seed}, "
        f"{time.monotonic() - started:.0f} s in all"
    )
    print_table(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.as_dict() for r in results.values()], f, indent=1)


if __name__ == "__main__":
    main()
