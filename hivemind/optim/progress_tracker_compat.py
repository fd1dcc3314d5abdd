"""Names of hivemind 1.1.12's ProgressTracker that user code may use, over this implementation's own parts."""

from __future__ import annotations

import threading
from typing import Callable


class StopRequest(threading.Event):
    """An event that, once set (by ``shutdown()`` or by a user), also tells the tracker's loop to stop."""

    def __init__(self, on_set: Callable[[], None]):
        super().__init__()
        self._on_set = on_set

    def set(self) -> None:
        super().set()
        self._on_set()


class ProgressTrackerPublicNames:
    """Mixed into ProgressTracker: each name gives the object that does that job here (see docs/compatibility.md)."""

    @property
    def lock_global_progress(self) -> threading.RLock:
        """Guards local and global progress: while a user holds it, no report or fetch changes them (re-entrant
        here). To change epochs, use ``with tracker.pause_updates(): tracker.update_epoch()``, as in 1.1.12."""
        return self._lock

    @property
    def shutdown_triggered(self) -> threading.Event:
        """Set once the tracker is asked to stop; setting it stops the tracker like ``shutdown()`` without the join."""
        return self._stop_requested
