"""The state lock of a TrainingStateAverager (``lock_optimizer``) and the background work that needs it: waiting for
that work while the calling thread holds the lock would never end, so it is refused with a RuntimeError instead;
and the gradients of an optimizer step queued behind another one, handed over without touching its buffers."""

from __future__ import annotations

import threading
from concurrent.futures import Future
from typing import List, Optional, Sequence

import torch

__all__ = [
    "GradientHandover", "LockOptimizerHeldError", "refuse_to_wait_under_the_lock", "work_waiting_for_the_lock",
]  # fmt: skip


class LockOptimizerHeldError(RuntimeError):
    """A call would wait forever for work that needs lock_optimizer, which the calling thread holds (retrying cannot
    help: the lock is released only by that thread)."""


def work_waiting_for_the_lock(
    lock: threading.RLock, step: Optional[Future], averaging: Optional[Future], state_read: Optional[threading.Event]
) -> Optional[str]:
    """
    What background work still needs ``lock``, which the calling thread holds (None if it does not hold it, or if
    nothing unfinished needs it): an optimizer step that has not finished (it takes the lock to run), or an
    averaging round that has not read the state yet (``state_read`` is set under the lock once it has; after that
    it only waits for peers, within its own timeouts). While this thread holds the lock neither can get past it, so
    the answer cannot change until the lock is released.
    """
    if not lock._is_owned():
        return None
    if step is not None and not step.done():
        return "the background optimizer step"
    if averaging is not None and not averaging.done() and (state_read is None or not state_read.is_set()):
        return "the background averaging round (it reads the state under the lock before it starts)"
    return None


def refuse_to_wait_under_the_lock(waiting_for: Optional[str], action: str) -> None:
    """RuntimeError saying that ``action`` would wait forever for ``waiting_for``, and what to do instead."""
    if waiting_for is not None:
        raise LockOptimizerHeldError(
            f"{action} would wait for {waiting_for} while this thread holds lock_optimizer, which that work needs: "
            f"it cannot go on until the lock is released, so release it first (see docs/optimizer.md)"
        )


class GradientHandover:
    """
    The gradients of an optimizer step that is queued while an earlier step is still running or queued (that step
    reads the optimizer's gradient buffers): copies taken when the step is requested, put into the buffers by the
    step itself, under the lock, just before it runs. Without it the earlier step could use the later gradients.
    """

    def __init__(self, main_parameters: Sequence[torch.Tensor]):
        with torch.no_grad():
            self.gradients: List[Optional[torch.Tensor]] = [
                None if main.grad is None else main.grad.detach().to("cpu", copy=True) for main in main_parameters
            ]

    @torch.no_grad()
    def load_into(self, optimizer_parameters: Sequence[torch.Tensor]) -> None:
        for param, grad in zip(optimizer_parameters, self.gradients):
            if grad is None or param.grad is None or param.grad.shape != grad.shape:
                param.grad = grad
            else:
                param.grad.copy_(grad)
