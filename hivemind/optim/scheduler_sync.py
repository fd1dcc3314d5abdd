"""Keep an LR scheduler at the training's epoch: step it there, also after loading a state of a later epoch."""

from __future__ import annotations

import contextlib
import copy
import warnings
from typing import Any, Iterator, List, Optional

import torch

from hivemind.utils.logging import get_logger

__all__ = [
    "MAX_SCHEDULER_CATCH_UP_STEPS",
    "catch_up_scheduler",
    "is_scheduler_instance",
    "scheduler_learning_rates_kept",
    "SchedulerStart",
]

logger = get_logger(__name__)

MAX_SCHEDULER_CATCH_UP_STEPS = 100_000  # an epoch far ahead (e.g. claimed by a faulty peer) must not hang a step


def is_scheduler_instance(scheduler: Any) -> bool:
    """Whether ``scheduler`` is a built LR scheduler (not a factory of one)."""
    return hasattr(scheduler, "step") and hasattr(scheduler, "optimizer")


def catch_up_scheduler(scheduler: Any, epoch: int, max_steps: int = MAX_SCHEDULER_CATCH_UP_STEPS) -> None:
    """Step an LR scheduler until it has counted ``epoch`` epochs, at most ``max_steps`` times per call."""
    if scheduler is None:
        return
    with warnings.catch_warnings():
        # torch warns when a scheduler steps before its optimizer ever did: a newcomer catching up does so on purpose
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
        for _ in range(max_steps):
            if getattr(scheduler, "last_epoch", epoch) >= epoch:
                return
            scheduler.step()
    logger.warning(
        f"The LR scheduler is {epoch - scheduler.last_epoch} epochs behind epoch {epoch}; it catches up "
        f"at most {max_steps} epochs per optimizer step"
    )


@contextlib.contextmanager
def scheduler_learning_rates_kept(optimizer: torch.optim.Optimizer, scheduler: Any, epoch: int) -> Iterator[None]:
    """
    Around loading into ``optimizer`` a state of ``epoch`` (a peer's, a checkpoint's), whose learning rates are
    already scheduled for that epoch: if ``scheduler`` is behind ``epoch``, the learning rates it is at come back after
    the load, so that catching it up (see :func:`catch_up_scheduler`) computes those of ``epoch`` once. Most
    schedulers (StepLR, ExponentialLR, CosineAnnealingLR...) compute a step's learning rate from the current one:
    stepping them from the loaded ones would apply the schedule twice. A scheduler already at ``epoch`` keeps the
    loaded learning rates.
    """
    behind = scheduler is not None and getattr(scheduler, "last_epoch", epoch) < epoch
    kept = [group.get("lr") for group in optimizer.param_groups] if behind else []
    try:
        yield
    finally:
        for group, lr in zip(optimizer.param_groups, kept):
            if lr is not None:
                group["lr"] = lr


class SchedulerStart:
    """
    An LR scheduler's state and its optimizer's learning rates as they were when training started, so that the
    scheduler can be rewound to an earlier epoch (schedulers only step forward): restoring a checkpoint of an epoch
    before the one the scheduler counted rewinds it here, then catches it up to the checkpoint's epoch.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, scheduler: Any):
        self._state: Optional[dict] = None
        self._learning_rates: List[Any] = []
        if scheduler is not None and hasattr(scheduler, "state_dict") and hasattr(scheduler, "load_state_dict"):
            with contextlib.suppress(Exception):  # (a scheduler whose state cannot be copied is never rewound)
                self._state = copy.deepcopy(scheduler.state_dict())
                self._learning_rates = [copy.deepcopy(group.get("lr")) for group in optimizer.param_groups]

    def rewind_for(self, optimizer: torch.optim.Optimizer, scheduler: Any, epoch: int) -> None:
        """If ``scheduler`` counted more than ``epoch`` epochs, bring it and the learning rates back to the start (a
        warning says so if the start is after ``epoch`` too, or the scheduler cannot be rewound)."""
        last_epoch = getattr(scheduler, "last_epoch", None) if scheduler is not None else None
        if not isinstance(last_epoch, int) or last_epoch <= epoch:
            return
        start_epoch = None if self._state is None else self._state.get("last_epoch")
        if not isinstance(start_epoch, int) or start_epoch > epoch:
            logger.warning(
                f"The LR scheduler is at epoch {last_epoch}, past the loaded epoch {epoch}, and cannot be rewound "
                f"there: its learning rates stay as they are until it counts epoch {last_epoch + 1}"
            )
            return
        scheduler.load_state_dict(copy.deepcopy(self._state))
        for group, lr in zip(optimizer.param_groups, self._learning_rates):
            if lr is not None:
                group["lr"] = copy.deepcopy(lr)
