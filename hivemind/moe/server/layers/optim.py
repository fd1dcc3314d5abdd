"""Optimizer wrappers for hosted experts."""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["OptimizerWrapper", "ClippingWrapper"]


class OptimizerWrapper(torch.optim.Optimizer):
    """Forwards every call to an inner optimizer; subclasses change one step of it.

    It passes ``isinstance(x, torch.optim.Optimizer)``, so learning-rate schedulers accept it. The inner optimizer
    owns all state (``torch.optim.Optimizer.__init__`` is deliberately not called).
    """

    def __init__(self, optim: torch.optim.Optimizer):
        self.inner = optim

    defaults = property(lambda self: self.inner.defaults)
    state = property(lambda self: self.inner.state)
    param_groups = property(lambda self: self.inner.param_groups)

    def __getstate__(self):
        # an lr scheduler replaces ``step`` on the instance with a wrapper that cannot be pickled; drop it, as
        # torch.optim.Optimizer does
        return {key: value for key, value in self.__dict__.items() if key != "step"}

    def __setstate__(self, state):
        self.__dict__.update(state)

    def __repr__(self):
        return f"{type(self).__name__}({self.inner!r})"

    def step(self, closure=None):
        return self.inner.step(closure)

    def zero_grad(self, set_to_none: bool = True):
        self.inner.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, state_dict) -> None:
        self.inner.load_state_dict(state_dict)

    def add_param_group(self, param_group: dict) -> None:
        self.inner.add_param_group(param_group)


class ClippingWrapper(OptimizerWrapper):
    """Scales gradients down so that their total L2 norm is at most ``clip_grad_norm`` before every step.

    :param optim: the optimizer to wrap
    :param clip_grad_norm: the largest allowed norm of all gradients together (None: no clipping)
    """

    def __init__(self, optim: torch.optim.Optimizer, clip_grad_norm: Optional[float]):
        super().__init__(optim)
        if clip_grad_norm is not None and not clip_grad_norm > 0:
            raise ValueError(f"clip_grad_norm must be positive or None, got {clip_grad_norm}")
        self.clip_grad_norm = clip_grad_norm

    def step(self, closure=None):
        if self.clip_grad_norm is not None:
            all_params = [param for group in self.inner.param_groups for param in group["params"]]
            torch.nn.utils.clip_grad_norm_(all_params, max_norm=self.clip_grad_norm)
        return super().step(closure)
