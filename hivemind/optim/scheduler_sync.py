"""Keep an LR scheduler at the training's epoch: step it there, also after loading a state of a later epoch."""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Iterator

import torch

from hivemind.utils.logging import get_logger

__all__ = [
    "MAX_SCHEDULER_CATCH_UP_STEPS",
    "catch_up_scheduler",
    "is_scheduler_instance",
    "scheduler_learning_rates_kept",
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
