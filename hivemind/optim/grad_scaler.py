"""GradScaler: PyTorch's AMP loss scaler adapted to hivemind.Optimizer, whose real optimizer step is once per epoch."""

from __future__ import annotations

import contextlib
from collections import defaultdict
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch

try:  # torch >= 2.3: one GradScaler for every device type
    from torch.amp import GradScaler as TorchGradScaler
except ImportError:  # pragma: no cover - older torch
    from torch.cuda.amp import GradScaler as TorchGradScaler

from hivemind.utils.logging import get_logger

__all__ = ["GradScaler"]

logger = get_logger(__name__)


def _is_hivemind_optimizer(optimizer: Any) -> bool:
    try:
        from hivemind.optim.optimizer import Optimizer  # same layer; imported late because optimizer.py imports us
    except ImportError:  # pragma: no cover - a partial installation without the optimizer
        return False
    return isinstance(optimizer, Optimizer)


class GradScaler(TorchGradScaler):
    """
    A drop-in replacement for ``torch.amp.GradScaler`` (same constructor) to use with :class:`hivemind.Optimizer`.

    With hivemind.Optimizer, ``optimizer.step()`` usually only accumulates gradients; the inner optimizer runs once per
    epoch, when the swarm has accumulated the target batch size. This scaler therefore:

    - ``step(optimizer)`` hands itself to ``optimizer.step(grad_scaler=self)``, which checks the gradients for inf/NaN
      (a batch with them is dropped, and the local accumulators reset) and accumulates them otherwise;
    - at the end of an epoch, the optimizer divides the accumulated gradients by this peer's scale
      (:meth:`unscale_accumulated_grads_`) *before* averaging them: each peer's scale is its own, so only unscaled
      gradients can be averaged. A peer whose accumulated gradients hold inf/NaN joins that round with weight 0;
    - ``unscale_(optimizer)`` only unscales during a local step of ``use_local_updates=True`` (inside
      :meth:`running_global_step`, which the optimizer enters); elsewhere it returns False and leaves gradients as
      they are;
    - ``update()`` only changes the scale after a real optimizer step or after inf/NaN were found, so that all
      gradients accumulated during one epoch share the same scale. It returns whether it did.

    Usage is the same as with PyTorch::

        scaler.scale(loss).backward()
        scaler.step(opt)  # opt is a hivemind.Optimizer
        scaler.update()
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._is_running_global_step = False
        self._optimizer_step_done = False  # an inner optimizer step happened since the last real update
        self._inf_found_since_update = False
        self._cached_finite: Dict[int, bool] = {}

    @contextlib.contextmanager
    def running_global_step(self):
        """Within this context (entered by hivemind.Optimizer), unscale_ and step act on the inner optimizer."""
        outer = self._is_running_global_step
        self._is_running_global_step = True
        try:
            yield
        finally:
            self._is_running_global_step = outer

    def unscale_(self, optimizer: torch.optim.Optimizer) -> bool:
        """Unscale the gradients of a global step; outside of it, a no-op returning False (see the class docs)."""
        if not self._is_running_global_step:
            if not _is_hivemind_optimizer(optimizer):
                raise ValueError(
                    f"hivemind.GradScaler.unscale_ expects a hivemind.Optimizer, got {type(optimizer).__name__}"
                )
            return False
        if not self._enabled:
            return False
        super().unscale_(self._inner(optimizer))
        return True

    def step(self, optimizer: torch.optim.Optimizer, *args, **kwargs) -> bool:
        """
        Outside a global step: ``optimizer`` must be a hivemind.Optimizer, called as ``optimizer.step(*args,
        grad_scaler=self, **kwargs)``. Inside one: the torch optimizer step, skipped if gradients have inf/NaN.
        Returns True if the call went through (a skipped inner step returns False).
        """
        if self._is_running_global_step:
            inner = self._inner(optimizer)
            if not self._enabled:
                inner.step(*args, **kwargs)
                self._optimizer_step_done = True
                return True
            super().step(inner, *args, **kwargs)
            self._optimizer_step_done = True
            return not self._found_any_inf(inner)
        if not _is_hivemind_optimizer(optimizer):
            raise ValueError(f"hivemind.GradScaler.step expects a hivemind.Optimizer, got {type(optimizer).__name__}")
        optimizer.step(*args, grad_scaler=self, **kwargs)
        return True

    def update(self, new_scale: Optional[float] = None) -> bool:
        """Update the scale if an optimizer step ran or inf/NaN were found since the last update; return whether."""
        if not self._enabled:
            return False
        if not (self._optimizer_step_done or self._inf_found_since_update or new_scale is not None):
            return False
        if new_scale is None and not any(
            state["found_inf_per_device"] for state in self._per_optimizer_states.values()
        ):
            return False  # nothing was checked (e.g. the inner step ran without this scaler): keep the scale
        super().update(new_scale)
        self._optimizer_step_done = self._inf_found_since_update = False
        self._cached_finite.clear()
        return True

    def are_grads_finite(self, optimizer: torch.optim.Optimizer, use_cached: bool = False) -> bool:
        """Whether the current gradients of ``optimizer``'s parameters are all finite (they are not modified)."""
        if not self._enabled:
            return True
        if use_cached and id(optimizer) in self._cached_finite:
            return self._cached_finite[id(optimizer)]
        self._check_inf_per_device(optimizer)
        finite = not self._found_any_inf(optimizer)
        if not finite:
            self._inf_found_since_update = True
        self._cached_finite[id(optimizer)] = finite
        return finite

    @torch.no_grad()
    def unscale_accumulated_grads_(self, optimizer: torch.optim.Optimizer, grads: Iterable[torch.Tensor]) -> bool:
        """
        Divide ``grads`` (gradients that ``optimizer`` accumulated at the current scale) by the scale, in place, and
        check them for inf/NaN; the result counts for ``optimizer``'s next :meth:`update`, as a step of it would.
        Returns whether they are all finite (if not, the caller must not use them: their values are undefined).
        """
        self._optimizer_step_done = True  # the scale may change now: the accumulated gradients were consumed
        self._cached_finite.clear()
        if not self._enabled:
            return True
        scale, _ = self._check_scale_growth_tracker("unscale_accumulated_grads_")
        inv_scale = scale.double().reciprocal().float()
        by_device_and_dtype: Dict[Tuple[torch.device, torch.dtype], List[torch.Tensor]] = defaultdict(list)
        for grad in grads:
            by_device_and_dtype[grad.device, grad.dtype].append(grad)
        found_inf_per_device: Dict[torch.device, torch.Tensor] = {}
        for (device, _dtype), group in by_device_and_dtype.items():
            if device not in found_inf_per_device:
                found_inf_per_device[device] = torch.zeros((), dtype=torch.float32, device=device)
            torch._amp_foreach_non_finite_check_and_unscale_(
                group, found_inf_per_device[device], inv_scale.to(device, non_blocking=True)
            )
        self._per_optimizer_states[id(optimizer)]["found_inf_per_device"] = found_inf_per_device
        finite = not self._found_any_inf(optimizer)
        if not finite:
            self._inf_found_since_update = True
            logger.info(f"The accumulated gradients are not finite at scale {scale.item()}: they are dropped")
        return finite

    def _found_any_inf(self, optimizer: torch.optim.Optimizer) -> bool:
        found = self._per_optimizer_states[id(optimizer)]["found_inf_per_device"]
        return any(bool(value.item()) for value in found.values())

    def _unscale_grads_(self, optimizer, inv_scale, found_inf, allow_fp16):
        # hivemind keeps fp16 gradients (e.g. reuse_grad_buffers with a half-precision model): allow unscaling them
        return super()._unscale_grads_(optimizer, inv_scale, found_inf, allow_fp16=True)

    @staticmethod
    def _inner(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """The torch optimizer doing the real step: hivemind.Optimizer.opt, or the optimizer itself."""
        return getattr(optimizer, "opt", optimizer) if _is_hivemind_optimizer(optimizer) else optimizer
