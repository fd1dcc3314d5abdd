"""Names of hivemind 1.1.12's TrainingStateAverager that user code may read, over this implementation's own parts."""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Set


class StateAveragerPublicNames:
    """Mixed into TrainingStateAverager: each name gives the object that does that job here (see
    docs/compatibility.md), not a copy of 1.1.12's internals."""

    @property
    def step_executor(self) -> ThreadPoolExecutor:
        """The one-thread executor that runs delayed optimizer steps and background averaging rounds, in order."""
        return self._executor

    @property
    def lock_optimizer(self) -> threading.RLock:
        """Held while the optimizer steps and while the state is read for a round or a download: hold it to change
        the optimizer or the parameters without racing a background step (re-entrant here). A call that would wait
        for background work needing it (an unfinished delayed step, a queued round that has not read the state yet)
        while this thread holds it raises RuntimeError instead of hanging: see docs/optimizer.md."""
        return self._state_lock

    @property
    def pending_updates(self) -> Set[Future]:
        """The background optimizer step and averaging round that are not applied to the model yet (running or
        finished): a new set on every read; ``step()`` applies the finished ones."""
        return {pending for pending in (self._pending_step, self._pending_averaging) if pending is not None}

    @property
    def reuse_tensors(self) -> bool:
        """Whether the averaged tensors are the optimizer's own tensors: never here, they are copied into separate
        shared buffers before each round (the ``reuse_tensors`` argument is accepted and changes nothing)."""
        return False
