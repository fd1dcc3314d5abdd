"""Learning-rate schedules for hosted experts."""

from __future__ import annotations

import torch
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["LinearWarmupDecay", "get_linear_schedule_with_warmup"]


class LinearWarmupDecay:
    """Learning-rate multiplier: rises linearly from 0 to 1 over ``num_warmup_steps``, then falls linearly to 0 at
    ``num_training_steps`` and stays 0. A class rather than a closure, so that schedulers using it can be pickled."""

    def __init__(self, num_warmup_steps: int, num_training_steps: int):
        if num_warmup_steps is None or num_training_steps is None:
            raise ValueError("the linear schedule needs num_warmup_steps and num_training_steps")
        if not 0 <= num_warmup_steps <= num_training_steps:
            raise ValueError(
                f"need 0 <= num_warmup_steps <= num_training_steps, got {num_warmup_steps} and {num_training_steps}"
            )
        self.num_warmup_steps, self.num_training_steps = int(num_warmup_steps), int(num_training_steps)

    def __call__(self, step: int) -> float:
        if step < self.num_warmup_steps:
            return step / max(1, self.num_warmup_steps)
        remaining = self.num_training_steps - step
        return max(0.0, remaining / max(1, self.num_training_steps - self.num_warmup_steps))


def get_linear_schedule_with_warmup(
    optimizer: torch.optim.Optimizer, num_warmup_steps: int, num_training_steps: int
) -> LambdaLR:
    """A LambdaLR scheduler with a linear warm-up to the optimizer's learning rate, then a linear decay to zero."""
    return LambdaLR(optimizer, LinearWarmupDecay(num_warmup_steps, num_training_steps))
