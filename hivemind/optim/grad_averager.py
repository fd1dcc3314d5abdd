"""GradientAverager: accumulates local gradients over several steps and averages them with peers once per epoch."""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Dict, Iterable, Iterator, Optional, Sequence

import torch

from hivemind.averaging.averager import DecentralizedAverager
from hivemind.averaging.control import StepControl
from hivemind.dht import DHT
from hivemind.utils.logging import get_logger
from hivemind.utils.value_checks import is_number

__all__ = ["GradientAverager", "GradientAveragerFactory"]

logger = get_logger(__name__)

GradientAveragerFactory = Callable[..., "GradientAverager"]


class GradientAverager(DecentralizedAverager):
    """
    Averages the gradients of ``parameters`` with peers. Each local step adds the current ``.grad`` into accumulators
    (:meth:`accumulate_grads_`); an averaging :meth:`step` loads ``accumulators / steps accumulated`` into the
    averaged buffers and all-reduces them, weighted by the samples this peer accumulated. The result is used through
    :meth:`use_averaged_gradients`.

    :param parameters: the model parameters whose gradients are averaged
    :param dht: a running DHT
    :param prefix: the averaging swarm's name (hivemind.Optimizer uses ``f"{run_id}_grad_averager"``)
    :param reuse_grad_buffers: accumulate in ``param.grad`` itself (backward adds into it) instead of separate
      buffers; the caller must then not zero the gradients between steps
    :param accumulate_grads_on: device of the accumulators (default: each parameter's device)
    :param client_mode: accept no incoming connections (default: the DHT's mode)
    :param warn: warn about options that cost memory or speed
    :param averaged_grads: pre-allocated buffers for the averaged gradients (default: new CPU tensors)
    :param averager_kwargs: options of :class:`DecentralizedAverager`
    """

    # fmt: off
    def __init__(self, parameters: Iterable[torch.nn.Parameter], *, dht: DHT, prefix: str,
                 reuse_grad_buffers: bool = False, accumulate_grads_on: Optional[torch.device] = None,
                 averaged_grads: Sequence[torch.Tensor] = (), client_mode: Optional[bool] = None, warn: bool = True,
                 **averager_kwargs):
        # fmt: on
        if isinstance(parameters, torch.Tensor):  # its rows are not leaves and never get a .grad: zeros averaged
            raise TypeError("parameters must be an iterable of parameters, got a single tensor: pass [tensor]")
        self.parameters = tuple(parameters)
        if not self.parameters:
            raise ValueError("GradientAverager needs at least one parameter")
        self.reuse_grad_buffers = reuse_grad_buffers
        self.warn = warn
        self.local_samples_accumulated = 0
        self.local_times_accumulated = 0
        self._anchor_batch_size: Optional[int] = None
        self._accumulated_weight = 0.0  # sum of the batch sizes accumulated, relative to the first one
        self._accumulators: Optional[tuple] = None
        if not reuse_grad_buffers:
            device = accumulate_grads_on
            self._accumulators = tuple(torch.zeros_like(g, device=device) for g in self._grads_from_parameters())
        if reuse_grad_buffers and accumulate_grads_on is not None and warn:
            logger.warning("accumulate_grads_on has no effect with reuse_grad_buffers=True (param.grad is used)")
        averaged_grads = tuple(averaged_grads)
        if not averaged_grads:
            with torch.no_grad():
                averaged_grads = tuple(
                    torch.zeros_like(grad, device="cpu") for grad in self._grads_from_parameters()  # shared below
                )
        elif len(averaged_grads) != len(self.parameters):
            raise ValueError(f"averaged_grads has {len(averaged_grads)} tensors for {len(self.parameters)} parameters")
        self._new_averaged_grads = False
        super().__init__(
            averaged_tensors=averaged_grads, dht=dht, prefix=prefix, client_mode=client_mode, **averager_kwargs
        )

    def __getstate__(self) -> Dict[str, Any]:
        """What a spawned (or forkserver) averager process receives: not the model's parameters nor the accumulators
        (they may live on a GPU, and only the user's process touches them); the averaged buffers are shared memory."""
        state = super().__getstate__()
        for name in ("parameters", "_accumulators"):
            state.pop(name, None)
        return state

    def _grads_from_parameters(self) -> Iterator[torch.Tensor]:
        """Each parameter's .grad, created as zeros where backward has not run yet."""
        for p in self.parameters:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            yield p.grad

    @torch.no_grad()
    def accumulate_grads_(self, batch_size: int) -> None:
        """Add the current gradients (computed on ``batch_size`` samples) to the accumulators."""
        if not is_number(batch_size):
            raise TypeError(f"batch_size must be a positive number of samples, got {batch_size!r}")
        if not 0 < batch_size < math.inf:  # (NaN too: it would become the sample count and the averaging weight)
            raise ValueError(f"batch_size must be a positive number of samples, got {batch_size}")
        if self._anchor_batch_size is None:
            self._anchor_batch_size = batch_size  # later batches are weighed relative to the first one
        self.local_samples_accumulated += batch_size
        self.local_times_accumulated += 1
        if self.reuse_grad_buffers:
            return  # backward already added the gradients into param.grad
        relative_size = batch_size / float(self._anchor_batch_size)
        self._accumulated_weight += relative_size
        for accumulator, grad in zip(self._accumulators, self._grads_from_parameters()):
            accumulator.add_(grad.to(accumulator.device), alpha=relative_size)

    def accumulated_grads(self) -> Iterator[torch.Tensor]:
        """The tensors the gradients accumulate in (``param.grad`` itself with ``reuse_grad_buffers``)."""
        if self.reuse_grad_buffers:
            yield from self._grads_from_parameters()
        else:
            yield from self._accumulators

    @torch.no_grad()
    def accumulated_grads_are_finite(self) -> bool:
        """Whether the accumulated gradients hold no inf or NaN (a warning says so if they do)."""
        finite = all(bool(torch.isfinite(grad).all()) for grad in self.accumulated_grads())
        if not finite:
            logger.warning(f"{self.prefix}: the accumulated gradients hold inf/NaN; this peer drops them")
        return finite

    @torch.no_grad()
    def load_accumulators_into_averager_(self) -> None:
        """
        Put the mean accumulated gradient into the averaged buffers: the mean over the samples accumulated (each
        step's gradient, a mean over its batch, weighed by its batch size), so that steps of different batch sizes
        give the gradient of the whole epoch's samples. With ``reuse_grad_buffers``, backward has summed the steps'
        gradients in ``param.grad`` as they were: their sum is divided by the number of steps.
        """
        if self.local_times_accumulated == 0 and self.warn:
            logger.warning("Averaging gradients with nothing accumulated: this peer contributes zeros")
        if self.reuse_grad_buffers:
            divisor = max(1, self.local_times_accumulated)
        else:
            divisor = self._accumulated_weight if self._accumulated_weight > 0 else 1.0
        with self.get_tensors() as averaged_grads:
            for averaged, accumulated in zip(averaged_grads, self.accumulated_grads()):
                averaged.copy_(accumulated, non_blocking=True).div_(divisor)
        self._new_averaged_grads = True

    @torch.no_grad()
    def reset_accumulated_grads_(self) -> None:
        """Zero the accumulators and counters."""
        for accumulated in self.accumulated_grads():
            accumulated.zero_()
        self._anchor_batch_size = None
        self._accumulated_weight = 0.0
        self.local_times_accumulated = 0
        self.local_samples_accumulated = 0

    def schedule_step(self, scheduled_time: Optional[float] = None, **kwargs) -> StepControl:
        """Start matchmaking for a future averaging round; the all-reduce waits for :meth:`step` (the trigger)."""
        if "weight" in kwargs:
            raise ValueError("the weight is set by step() (samples accumulated), not by schedule_step()")
        return DecentralizedAverager.step(
            self, scheduled_time=scheduled_time, wait=False, require_trigger=True, **kwargs
        )

    # fmt: off
    def step(self, weight: Optional[float] = None, reset_accumulators: bool = True,
             control: Optional[StepControl] = None, timeout: Optional[float] = None, wait: bool = True, **kwargs):
        # fmt: on
        """
        Average the accumulated gradients with peers.

        :param weight: this peer's weight (default: samples accumulated since the last reset)
        :param reset_accumulators: zero the accumulators once their mean was loaded into the averaged buffers
        :param control: a round from :meth:`schedule_step` (default: schedule one now)
        :param timeout: matchmaking deadline (seconds) of a round scheduled here
        :param wait: return the gathered dict (raises on failure); False: return the StepControl
        """
        if control is None:
            control = self.schedule_step(timeout=timeout, **kwargs)
        elif kwargs:
            raise ValueError(f"options {sorted(kwargs)} apply to a new round, not to a given control")
        if weight is None:
            weight = self.local_samples_accumulated
        self.load_accumulators_into_averager_()
        control.weight = float(weight)
        control.allow_allreduce()
        if reset_accumulators:
            self.reset_accumulated_grads_()
        if not wait:
            return control
        return control.result(timeout)

    @contextlib.contextmanager
    def use_averaged_gradients(self):
        """Within this context, each ``param.grad`` holds the averaged gradient (the old ones come back after)."""
        self._new_averaged_grads = False
        with self.get_tensors() as averaged_grads:
            local_grads = [p.grad for p in self.parameters]
            try:
                for p, averaged in zip(self.parameters, averaged_grads):
                    p.grad = averaged.to(device=p.device, dtype=p.dtype)
                yield averaged_grads
            finally:
                for p, local_grad in zip(self.parameters, local_grads):
                    p.grad = local_grad

    def notify_used_averaged_gradients(self) -> None:
        """Tell the averager that the averaged gradients were consumed (no warning about unused results)."""
        self._new_averaged_grads = False
