"""
Freezing a process in tests with SIGSTOP, and returning only once it is really stopped; waiting for processes to end.

``kill(pid, SIGSTOP)`` returns before the process stops: the kernel wakes one of its threads, and only when that
thread runs does it stop the others. On a busy machine the other threads (a Go daemon's, say) may go on serving
requests for milliseconds after ``kill`` returned, so a test that sends a request right after it may get an answer.
"""

import os
import signal
import time

import psutil


def _all_threads_stopped(pid: int) -> bool:
    for thread in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{thread}/stat") as stat:
                state = stat.read().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:  # the thread exited meanwhile
            continue
        if state not in ("T", "t"):
            return False
    return True


def freeze(pid: int, timeout: float = 10.0) -> None:
    """Send SIGSTOP to ``pid`` and wait until every one of its threads has stopped."""
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + timeout
    while not _all_threads_stopped(pid):
        assert time.monotonic() < deadline, f"process {pid} did not stop within {timeout} s of SIGSTOP"
        time.sleep(0.001)


def _tree(pid: int) -> list:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def freeze_tree(pid: int) -> None:
    """Freeze ``pid`` and all of its descendants (each is stopped when this returns)."""
    for process in _tree(pid):
        freeze(process.pid)


def thaw_tree(pid: int) -> None:
    """Send SIGCONT to ``pid`` and all of its descendants."""
    for process in _tree(pid):
        os.kill(process.pid, signal.SIGCONT)


def still_running(pids, timeout: float) -> list:
    """Wait up to ``timeout`` seconds for the processes ``pids`` (those that exist) to end; kill the others and
    describe those that were really still running (not zombies waiting to be reaped) as "pid (name)"."""
    processes = []
    for pid in pids:
        try:
            processes.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(processes, timeout=timeout)
    survivors = []
    for process in alive:
        try:
            if process.status() != psutil.STATUS_ZOMBIE:
                survivors.append(f"{process.pid} ({process.name()})")
            process.kill()
        except psutil.NoSuchProcess:
            pass
    return survivors
