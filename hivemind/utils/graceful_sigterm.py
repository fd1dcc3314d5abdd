"""SIGTERM in a library child process that serves on an event loop: a clean stop while it serves, else the default."""

import asyncio
import os
import signal
import threading
from typing import Optional

_stopping_on_sigterm = False  # this process got a SIGTERM while serving and is shutting down because of it
# grace=None (a shutdown_timeout of None: the owner waits as long as it takes): the SIGTERM still ends the process
# after this many seconds if its clean-up hangs (which then ignored it for good)
DEFAULT_GRACE = 5.0


def stopping_on_sigterm() -> bool:
    """Whether this process is shutting down on a SIGTERM (see GracefulSigterm). A SIGTERM that stops a program
    usually reaches all its processes at once, its p2pd too: the daemon's exit is then part of the shutdown."""
    return _stopping_on_sigterm


class GracefulSigterm:
    """
    The first SIGTERM while the child serves sets ``stop`` (as its ``shutdown()`` would), so the child stops its node,
    daemon and sockets before it exits. Without it, a SIGTERM to the whole process group (a service manager stopping
    the user's program) or multiprocessing's ``terminate()`` of a daemonic child at interpreter exit killed the child
    at once and left its Unix sockets in the temporary directory.

    A SIGTERM while the child is still starting, a second SIGTERM, and the first one once ``grace`` seconds passed
    have the default effect (the process ends), so ``terminate()`` still ends a child that does not stop when asked.
    ``grace=None`` (no shutdown_timeout) means ``DEFAULT_GRACE`` seconds.

    Install it in the child's main thread, after creating its loop; call ``serving()`` once it serves.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, stop: asyncio.Event, grace: Optional[float]):
        self.loop, self.stop, self.grace = loop, stop, DEFAULT_GRACE if grace is None else grace
        self._serving = False

    def install(self) -> "GracefulSigterm":
        signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def serving(self) -> None:
        self._serving = True

    def _on_sigterm(self, _signal_number, _frame) -> None:
        global _stopping_on_sigterm
        if not self._serving:
            _end_by_sigterm()
        _stopping_on_sigterm = True
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
        try:
            self.loop.call_soon_threadsafe(self.stop.set)
        except RuntimeError:  # the loop is closed: the clean-up is over, nothing is left to stop
            _end_by_sigterm()
        deadline = threading.Timer(self.grace, _end_by_sigterm)
        deadline.daemon = True
        deadline.start()


def _end_by_sigterm() -> None:
    if threading.current_thread() is threading.main_thread():  # (elsewhere signal.signal raises ValueError; the
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # grace timer runs after _on_sigterm has restored the default)
    os.kill(os.getpid(), signal.SIGTERM)
