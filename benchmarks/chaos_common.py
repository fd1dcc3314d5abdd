"""Pieces shared by the chaos benchmarks (chaos_averaging, chaos_dht, chaos_optimizer, chaos_moe).

Each benchmark runs its peers as child processes, each in a session of its own (so a signal to the process group
reaches its DHT, p2pd and other children), talks to them by JSON lines on their stdout, and kills, freezes and
restarts them from a driver loop. This module holds what every driver does the same way: starting a child, reading its
records, its process tree, killing it (whole group or main process only, then checking that the orphans exit by
themselves), closing it at the end, sampling its memory, and counting the warnings of its log.
"""

import collections
import json
import os
import re
import signal
import subprocess
import threading
import time
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import psutil

MIB = 2**20
WARNING_LINE = re.compile(r"\[(WARN|ERROR|CRITICAL)\] (\[[^]]*\] )?(.*)")


# ---------------------------------------------------------------------------------------------------- in the children


def wait_for_eof(stop: threading.Event) -> None:
    """Set ``stop`` once the driver closes our stdin (read with os.read: a thread blocked in sys.stdin.read() holds a
    lock that a forked child would need)."""
    while os.read(0, 4096):
        pass
    stop.set()


def make_emit(lock: Optional[threading.Lock] = None) -> Callable[..., None]:
    """A function that prints its keyword arguments as one JSON line (under ``lock`` when several threads emit)."""

    def emit(**record) -> None:
        if lock is None:
            print(json.dumps(record), flush=True)
            return
        with lock:
            print(json.dumps(record), flush=True)

    return emit


# ---------------------------------------------------------------------------------------------------- in the driver


def spawn(command: List[str], log_path: str, env: Optional[Dict[str, str]] = None) -> subprocess.Popen:
    """Start a child in a session of its own: stdin and stdout are pipes to the driver, stderr goes to ``log_path``."""
    with open(log_path, "w") as log:
        return subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True, start_new_session=True,
            env=env,
        )  # fmt: skip


def json_records(process: subprocess.Popen) -> Iterator[dict]:
    """The JSON records a child prints on its stdout, until it exits (other lines are skipped)."""
    for line in process.stdout:
        try:
            yield json.loads(line)
        except ValueError:
            continue


def family(pid: int) -> List[psutil.Process]:
    """The process and all its descendants (empty if it is gone)."""
    try:
        root = psutil.Process(pid)
        return [root] + root.children(recursive=True)
    except psutil.Error:
        return []


def reap_orphans(label: str, processes: List[psutil.Process], grace: float, leaked: List[str], note: str) -> None:
    """Wait up to ``grace`` s for the processes to exit; each one still running is reported in ``leaked`` (as
    "<label>: <name> (pid N) <note>") and killed."""
    _, alive = psutil.wait_procs(processes, timeout=grace)
    for process in alive:
        try:
            leaked.append(f"{label}: {process.name()} (pid {process.pid}) {note}")
            process.kill()
        except psutil.Error:
            pass


def kill(label: str, process: subprocess.Popen, whole_group: bool, grace: float, leaked: List[str], note: str):
    """SIGKILL to the child's whole process group (a machine that dies), or to its main process only: then its
    children must exit by themselves within ``grace`` s (checked in a thread, see reap_orphans)."""
    processes = family(process.pid)
    if whole_group:
        os.killpg(process.pid, signal.SIGKILL)
    else:
        process.kill()
        threading.Thread(target=reap_orphans, args=(label, processes, grace, leaked, note), daemon=True).start()


def wait_or_kill(process: subprocess.Popen, timeout: float) -> bool:
    """Wait for the child to exit; after ``timeout`` s SIGKILL its process group and return False."""
    try:
        process.wait(timeout)
        return True
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        return False


def close_all(members: Iterable, timeout: float, leaked: List[str]) -> None:
    """Close the stdin of each member (``.label``, ``.process``): a clean shutdown; one that has not exited
    ``timeout`` s later is reported in ``leaked`` and killed."""
    members = list(members)
    for member in members:
        member.process.stdin.close()
    for member in members:
        if not wait_or_kill(member.process, timeout):
            leaked.append(f"{member.label}: did not exit after its stdin closed")


def kill_all(processes: Iterable[subprocess.Popen]) -> None:
    """SIGKILL the process group of every child still running (the driver's last word, even after an error)."""
    for process in processes:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)


def run_chaos(chaos, members: dict, records: Callable[..., dict]) -> None:
    """``chaos.run()``, then SIGKILL to the children of ``members`` (label -> an object with ``.process``, filled by
    the run) left running, even after an error, then ``records(chaos)`` written to records.json in ``chaos.workdir``
    (the raw data, for a look after the report)."""
    try:
        chaos.run()
    finally:
        kill_all(member.process for member in members.values())
    with open(os.path.join(chaos.workdir, "records.json"), "w") as file:
        json.dump(records(chaos), file)


def measure(
    processes: List[psutil.Process], own_memory: bool = False, only_pid: Optional[int] = None, shm: bool = False
) -> Tuple[int, int, set]:
    """(memory of the python processes, memory of p2pd, files in use): RSS, or USS (memory not shared) with
    ``own_memory``; only the process ``only_pid`` counts on the python side if given. Files: p2pd's unix sockets and,
    with ``shm``, the /dev/shm files mapped by any of the processes."""
    python, p2pd, files = 0, 0, set()
    for process in processes:
        try:
            with process.oneshot():
                if process.name() == "p2pd":
                    p2pd += process.memory_full_info().uss if own_memory else process.memory_info().rss
                    files.update(c.laddr for c in process.net_connections("unix") if c.laddr)
                elif only_pid is None or process.pid == only_pid:
                    python += process.memory_full_info().uss if own_memory else process.memory_info().rss
                if shm:
                    files.update(m.path for m in process.memory_maps() if m.path.startswith("/dev/shm/"))
        except (psutil.Error, OSError):
            pass
    return python, p2pd, files


def drive(lock: threading.Lock, rng, args, until: float, chaos_ended: float, first_action: float, act, sample) -> None:
    """The driver loop until ``until``: ``act()`` from ``first_action`` on, every ``args.chaos_every`` s on average
    (exponential gaps) until ``chaos_ended``; ``sample()`` now and every ``args.rss_every`` s; both under ``lock``."""
    next_action, next_sample = first_action, time.time()
    while time.time() < until:
        now = time.time()
        with lock:
            if next_action <= now < chaos_ended:
                act()
                next_action = now + rng.expovariate(1 / args.chaos_every)
            if now >= next_sample:
                sample()
                next_sample = now + args.rss_every
        time.sleep(0.2)


# ---------------------------------------------------------------------------------------------------- in the reports


def percentile(values: List[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * (len(values) - 1)))]


def normalize(text: str, hex_digits: int = 16, limit: int = 140) -> str:
    """The text with peer ids, hex strings of ``hex_digits``+ digits and numbers masked (to count messages alike)."""
    text = re.sub(rf"\b(Qm|12D3)\w+|\b[0-9a-f]{{{hex_digits},}}\b", "<id>", text)
    return re.sub(r"\d+(\.\d+)?", "N", text)[:limit]


def log_warnings(paths: Iterable[str], **normalize_options) -> collections.Counter:
    """Warnings, errors and tracebacks in the given log files, counted by their text (see normalize)."""
    warnings = collections.Counter()
    for path in paths:
        with open(path, errors="replace") as log:
            for line in log:
                found = WARNING_LINE.search(line)
                if found:
                    warnings[f"{found.group(1)} {normalize(found.group(3), **normalize_options)}"] += 1
                elif line.startswith("Traceback"):
                    warnings["Traceback"] += 1
    return warnings


def first_peak_last(values: List[float], separator: str = " / ") -> str:
    return separator.join(f"{value:.0f}" for value in (values[0], max(values), values[-1]))


def print_memory_table(peers: Iterable, count_name: str, count: Callable, python_name: str, skip: int = 0) -> None:
    """One row per peer (``.label``, ``.started``, ``.rss`` samples (time, python bytes, p2pd bytes)) that has samples:
    seconds it lived, ``count(peer)``, first/peak/last memory of its python side and of its p2pd (MiB); the first
    ``skip`` samples are left out where there are more."""
    print(
        f"\n| Peer | lived (s) | {count_name} | {python_name} first/peak/last (MiB) | p2pd RSS first/peak/last (MiB) |"
    )
    print("|---|---|---|---|---|")
    for peer in peers:
        samples = peer.rss[skip:] or peer.rss
        if samples:
            python, p2pd = (first_peak_last([sample[i] / MIB for sample in samples]) for i in (1, 2))
            print(f"| {peer.label} | {samples[-1][0] - peer.started:.0f} | {count(peer)} | {python} | {p2pd} |")


def print_warnings(paths: Iterable[str], whose: str, most: int = 10, **normalize_options) -> None:
    print(f"\nmost frequent warnings and errors in the {whose}' logs:")
    for line, count in log_warnings(paths, **normalize_options).most_common(most):
        print(f"  {count:5d}  {line}")
