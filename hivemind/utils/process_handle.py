"""What the library's background processes (the DHT, the averager) share: being a context manager that shuts the
process down, a last-chance shutdown when the handle is garbage-collected, and a quick exit once the child's own
clean-up is done."""

import asyncio
import atexit
import functools
import math
import multiprocessing as mp
import multiprocessing.connection
import multiprocessing.util
import os
import signal
import sys
import threading
import time
import weakref
from typing import Callable, List, Optional, Sequence, TypeVar

from hivemind.utils.value_checks import is_number

# after every other multiprocessing finalizer of the child (those run in decreasing priority; mpfuture's is 10, the
# removal of multiprocessing's own temporary directory, e.g. made for sending torch tensors to another process, -100)
_EXIT_PRIORITY = -101

Handle = TypeVar("Handle", bound="ShutdownOnExit")


class ShutdownOnExit:
    """
    Mixin for a ``multiprocessing.Process`` subclass that defines ``shutdown()`` and sets ``_origin_pid`` (the pid of
    the creating process): ``with handle: ...`` shuts the process down on exit, and so does garbage collection of a
    handle that was started and is still alive in the creating process (never in a process that holds a copy).
    """

    def __enter__(self: Handle) -> Handle:
        return self

    def __exit__(self, *exc_info) -> None:
        self.shutdown()

    def __del__(self):
        if getattr(self, "_origin_pid", None) == os.getpid() and getattr(self, "_popen", None) is not None:
            try:
                if self.is_alive():
                    self.shutdown()
            except Exception:
                pass


def check_shutdown_timeout(shutdown_timeout: object, allow_none: bool = False) -> None:
    """Refuse a shutdown_timeout that is not seconds: shutdown() would fail halfway, after asking the process to end
    (None, where allowed, waits for the process as long as it takes)"""
    if shutdown_timeout is None and allow_none:
        return
    if not is_number(shutdown_timeout):
        raise TypeError(f"shutdown_timeout must be a number of seconds, got {shutdown_timeout!r}")
    if math.isnan(shutdown_timeout):
        raise ValueError("shutdown_timeout must be a number of seconds, got NaN")


def how_it_ended(exitcode: int) -> str:
    """An ended process's exit code in words: "was killed by signal SIGKILL" or "exited with code 1"."""
    if exitcode < 0 and -exitcode in signal.valid_signals():
        return f"was killed by signal {signal.Signals(-exitcode).name}"
    return f"exited with code {exitcode}"


def was_started(process) -> bool:
    """Whether ``process.start()`` ran in this process (unlike ``is_alive()``, never reaps an ended child)."""
    return getattr(process, "_popen", None) is not None


def peek_exitcode(process, wait: float = 0.0) -> Optional[int]:
    """
    ``process.exitcode`` that leaves the process to ``join()``: None while it runs or when it cannot be told.

    Reading ``exitcode`` reaps the child with ``waitpid``; of two threads that do so at once (e.g. a watcher thread
    and the user's ``join()``), the loser gets "no such child" and multiprocessing then reports exit code None for a
    process that exited. This peeks with ``waitid(..., WNOWAIT)`` instead.

    :param wait: seconds to keep asking while the status is not known yet (a child's pipes close a moment before
        its exit status is known)
    """
    deadline = time.monotonic() + wait
    while (code := _peek_exitcode_once(process)) is None and time.monotonic() < deadline:
        time.sleep(0.01)
    return code


def _peek_exitcode_once(process) -> Optional[int]:
    popen = getattr(process, "_popen", None)
    if popen is None or getattr(popen, "returncode", None) is not None or not hasattr(os, "waitid"):
        return getattr(popen, "returncode", None)
    try:  # WNOWAIT leaves the exited child to be reaped by its own Popen
        status = os.waitid(os.P_PID, popen.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except (ChildProcessError, AttributeError):  # already reaped, or not this process's child
        return popen.returncode
    if status is None:  # still running
        return None
    return status.si_status if status.si_code == os.CLD_EXITED else -status.si_status


_stop_locks: "weakref.WeakKeyDictionary[ShutdownOnExit, threading.RLock]" = weakref.WeakKeyDictionary()
_stop_locks_guard = threading.RLock()  # reentrant: a garbage-collected handle may shut down while it is held


def stop_lock(handle: "ShutdownOnExit") -> threading.RLock:
    """
    The lock under which ``shutdown()`` stops and joins ``handle``'s process: one thread at a time.

    Of two threads that join the same child at once, one reaps it and the other's ``waitpid`` gets "no such child":
    multiprocessing then takes the process for alive, so shutdown() warned that it "did not shut down" and sent a
    signal to a pid that may already belong to another process. A thread that comes second finds it stopped.

    Reentrant: a signal handler that calls ``shutdown()`` runs in the main thread, possibly while that thread is in
    ``shutdown()`` already (e.g. a SIGTERM during the one in a ``finally:``); it must not wait for itself forever.
    """
    with _stop_locks_guard:
        lock = _stop_locks.get(handle)
        if lock is None:
            lock = _stop_locks[handle] = threading.RLock()
        return lock


def close_in_other_children(handle: object, attributes: Sequence[str]) -> None:
    """
    Call in the creating process right after making ``handle``'s pipes: every multiprocessing child forked from
    this process while ``handle`` is alive closes its copies of the connections ``handle.<attribute>`` (the ends meant
    for ``handle``'s own process), except ``handle``'s own process when ``handle`` is one (for another object, such as
    a task pool whose pipes only its owner uses, every child closes them).

    A copy of such an end in another process (e.g. another DHT or averager, or a user's worker, forked after
    ``handle`` was created and before it was started) kept the pipe open after ``handle``'s process died: the
    creating process never saw it end, and every call to it, and every running averaging step, waited forever.
    """
    multiprocessing.util.register_after_fork(
        handle, functools.partial(_close_unless_own, attributes=tuple(attributes))
    )


def _close_unless_own(handle: object, attributes: Sequence[str]) -> None:
    if mp.current_process() is handle:
        return
    for name in attributes:
        connection = getattr(handle, name, None)
        if connection is not None:
            try:
                connection.close()
            except OSError:
                pass


_non_daemonic_handles: List[weakref.ref] = []  # started in this process, oldest first
_started_handles: "weakref.WeakSet[ShutdownOnExit]" = weakref.WeakSet()  # all started in this process


def register_started_handle(handle: "ShutdownOnExit") -> None:
    """
    Call right after starting ``handle``'s process, in the creating process.

    If it is not daemonic, it is shut down at interpreter exit (after the user's own atexit hooks registered since
    hivemind was imported, newest handle first): multiprocessing joins every non-daemonic child at exit, and these
    children only end when told to or when the creator is gone, so a script that forgot shutdown() never exited.
    Daemonic children are left to multiprocessing, which terminates them after every atexit hook.

    A child made with a plain ``os.fork()`` forgets the handle (see _forget_parents_handles).
    """
    _started_handles.add(handle)
    if handle.daemon:
        return
    _non_daemonic_handles[:] = [ref for ref in _non_daemonic_handles if ref() is not None]
    _non_daemonic_handles.append(weakref.ref(handle))


def _forget_parents_handles() -> None:
    """
    In a forked child: the parent's processes are not ours. A child of a plain ``os.fork()`` (not started by
    multiprocessing, which resets its own bookkeeping) that exits normally would otherwise run multiprocessing's exit
    hook over the parent's children it inherited: terminate the daemonic ones (the parent's DHT stopped) and fail to
    join them ("can only join a child process").
    """
    global _stop_locks_guard
    _stop_locks_guard = threading.RLock()  # (the parent's locks may have been held by another thread at the fork)
    _stop_locks.clear()
    children = getattr(mp.process, "_children", None)
    for handle in list(_started_handles):
        if children is not None:
            children.discard(handle)
    _started_handles.clear()
    _non_daemonic_handles.clear()


os.register_at_fork(after_in_child=_forget_parents_handles)


def _shut_down_non_daemonic_handles() -> None:
    while _non_daemonic_handles:
        handle = _non_daemonic_handles.pop()()
        if handle is not None:
            try:
                handle.shutdown()
            except Exception as e:
                print(f"Could not shut down {type(handle).__name__} at exit: {e!r}", file=sys.stderr)


# registered after multiprocessing's own exit hook (imported above), so that it runs before that hook joins children
atexit.register(_shut_down_non_daemonic_handles)


def exit_once_cleaned_up(start_method: str) -> None:
    """
    Call at the end of a child process's ``run()``, after its own clean-up, inside that child: once multiprocessing's
    other finalizers ran, the process ends right away with exit code 0.

    A spawned child would otherwise finalize its whole interpreter: with torch imported (a spawned child re-imports
    the user's main module), garbage-collecting every module took 0.7-1.2 s on an idle 2-core machine and more on a
    busy one, long enough for the creating process to give up waiting and terminate it. Since that interpreter's
    ``atexit`` handlers (e.g. weakref finalizers that stop a forgotten p2pd) belong to the child, they run first.
    A forked child never runs the ``atexit`` handlers it inherited from its parent, and neither does this.

    :param start_method: how the child was started ("fork", "spawn" or "forkserver")
    """
    run_exit_handlers = start_method == "spawn"
    multiprocessing.util.Finalize(None, _exit_now, args=(run_exit_handlers,), exitpriority=_EXIT_PRIORITY)


def _exit_now(run_exit_handlers: bool) -> None:
    if run_exit_handlers:
        atexit._run_exitfuncs()  # errors are printed there and do not stop the other handlers
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(0)


# how often a child without a pidfd for its parent (not Linux >= 5.3) checks whether its parent is still there
PARENT_POLL_INTERVAL = 0.5


def stop_when_parent_exits(
    process: mp.process.BaseProcess, loop: asyncio.AbstractEventLoop, stop: Callable[[], None]
) -> Optional[Callable[[], None]]:
    """
    Inside a child ``process``: call ``stop()`` from ``loop`` once the process that started it has ended, however it
    ended (a SIGKILL or ``os._exit`` runs none of its clean-up). Returns a function that stops watching, or None when
    ``process`` is not the current process (``run()`` called in the user's own process) or has no parent.

    The end of the pipe to the parent is not enough: a child forked while the parent held the pipes of other children
    (e.g. several created before any was started) keeps copies of their parent-side ends, and they of its, so that
    no pipe of theirs ever closes and all of them (and their p2pd daemons) run on as orphans. multiprocessing's parent
    sentinel is no better: any process forked from the parent later (a DataLoader worker, a plain ``os.fork()``) holds
    a copy of its other end for as long as it lives. So the parent process itself is watched: through a pidfd, which
    becomes readable the moment it ends, or where there is none, by checking every PARENT_POLL_INTERVAL seconds
    whether this process was handed to another parent.
    """
    parent = mp.parent_process()
    if mp.current_process() is not process or parent is None:
        return None
    sentinel = parent.sentinel
    original_ppid = os.getppid()
    try:
        pidfd = _open_pidfd(parent.pid)  # (with forkserver, parent.pid is the process that asked for us, not our ppid)
    except ProcessLookupError:  # it ended before we got here (e.g. while a spawned child imported): our ppid changed
        loop.call_soon(stop)  # already, so watching for that change would wait forever
        return lambda: None
    poll_handle: Optional[asyncio.TimerHandle] = None
    watching = True

    def _stop_watching() -> None:
        nonlocal watching, pidfd
        if not watching:
            return
        watching = False
        loop.remove_reader(sentinel)  # it stays readable: without this, the callback would spin until the loop ends
        if pidfd is not None:
            loop.remove_reader(pidfd)
            os.close(pidfd)
            pidfd = None
        if poll_handle is not None:
            poll_handle.cancel()

    def _on_parent_exit() -> None:
        _stop_watching()
        stop()

    def _poll() -> None:
        nonlocal poll_handle
        if os.getppid() != original_ppid:
            _on_parent_exit()
        else:
            poll_handle = loop.call_later(PARENT_POLL_INTERVAL, _poll)

    loop.add_reader(sentinel, _on_parent_exit)
    if pidfd is not None:
        loop.add_reader(pidfd, _on_parent_exit)
        if os.getppid() != original_ppid:  # it ended before the pidfd was opened (its pid may be another's now)
            loop.call_soon(_on_parent_exit)
    else:
        poll_handle = loop.call_later(PARENT_POLL_INTERVAL, _poll)
    return _stop_watching


def _open_pidfd(pid: int) -> Optional[int]:
    """A descriptor that becomes readable when process ``pid`` ends (None where the system has none); raises
    ProcessLookupError when that process has ended already."""
    pidfd_open = getattr(os, "pidfd_open", None)
    if pidfd_open is None:
        return None
    try:
        return pidfd_open(pid)
    except ProcessLookupError:
        raise
    except OSError:  # an older kernel, a sandbox that forbids it
        return None


def recv_unless_parent_exits(connection: "mp.connection.Connection") -> object:
    """
    ``connection.recv()`` inside a multiprocessing child, which also ends (with EOFError, as at the pipe's end) once
    the process that started it has ended: the other end of the pipe stays open while any process forked from the
    parent later (e.g. with a plain ``os.fork()``) holds a copy of it (see stop_when_parent_exits).
    """
    parent = mp.parent_process()
    original_ppid = os.getppid()
    try:
        pidfd = None if parent is None else _open_pidfd(parent.pid)
    except ProcessLookupError:  # it ended before we got here
        if connection.poll():
            return connection.recv()
        raise EOFError(f"the parent process {parent.pid} has ended") from None
    watched = [connection] if pidfd is None else [connection, pidfd]
    try:
        while True:
            ready = mp.connection.wait(watched, timeout=PARENT_POLL_INTERVAL)
            if connection in ready:
                return connection.recv()
            # a readable pidfd: it ended (with forkserver our ppid, the fork server's, never changes: this spun)
            if pidfd in ready or (parent is not None and os.getppid() != original_ppid):
                raise EOFError(f"the parent process {parent.pid} has ended")
    finally:
        if pidfd is not None:
            os.close(pidfd)
