"""How hivemind.Optimizer behaves like a torch optimizer: frozen parameters are left as they are."""

from __future__ import annotations

import contextlib
from typing import Sequence

import torch

__all__ = ["frozen_gradients_hidden"]


@contextlib.contextmanager
def frozen_gradients_hidden(model_params: Sequence[torch.Tensor], optimizer_params: Sequence[torch.Tensor]):
    """
    Within this context, the optimizer parameters of model parameters that do not require grad have no ``.grad``, so
    that a torch optimizer skips them (no weight decay, no momentum) as it would in local training: averaging fills
    a gradient buffer for every parameter, with zeros for the frozen ones.
    """
    hidden = [
        (param, param.grad)
        for main, param in zip(model_params, optimizer_params)
        if not main.requires_grad and param.grad is not None
    ]
    for param, _ in hidden:
        param.grad = None
    try:
        yield
    finally:
        for param, grad in hidden:
            param.grad = grad
