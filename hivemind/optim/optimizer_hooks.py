"""The parts of hivemind.Optimizer that a subclass may replace: how its averagers and its progress tracker are built,
when averaging rounds are booked ahead of the end of an epoch, and the check of its keyword arguments.

Downstream optimizers built on hivemind.Optimizer (e.g. OpenDiLoCo's DiLoCoOptimizer) override these methods to
plug in their own TrainingStateAverager, gradient averager or ProgressTracker subclasses.
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import Any, Callable, Dict, Optional

from hivemind.averaging.control import StepControl
from hivemind.optim.epoch_rule import next_epoch, should_schedule_averaging
from hivemind.optim.grad_averager import GradientAverager
from hivemind.optim.optimizer_options import averager_opts_for
from hivemind.optim.progress_tracker import ProgressTracker
from hivemind.optim.round_watch import WATCH_PERIOD, left_alone, watch_unlimited_round
from hivemind.optim.state_averager import TrainingStateAverager
from hivemind.utils.logging import get_logger
from hivemind.utils.performance_ema import PerformanceEMA
from hivemind.utils.timed_storage import get_dht_time

__all__ = ["OptimizerHooks", "is_pending"]

logger = get_logger(__name__)


def _check_factory_takes(factory: Callable, averager_opts: Dict[str, Any]) -> None:
    """TypeError, saying why and what to do, if ``factory`` cannot take these ``averager_opts`` as keywords (as a
    grad_averager_factory written for hivemind 1.1.12, which gives them to the state averager only, may not)."""
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # (no signature to read: the call itself tells)
        return
    if any(parameter.kind is inspect.Parameter.VAR_KEYWORD for parameter in parameters.values()):
        return
    missing = sorted(set(averager_opts) - set(parameters))
    if missing:
        raise TypeError(
            f"grad_averager_factory takes no {missing}, which averager_opts give it: averager_opts configure both "
            f"averagers here (hivemind 1.1.12 gives them to the state averager only); let the factory take **kwargs "
            f"and pass them on to its averager (or drop them to leave them to the state averager)"
        )


def is_pending(control: Optional[StepControl]) -> bool:
    return control is not None and not control.done()


class OptimizerHooks:
    """
    Mixin of :class:`hivemind.Optimizer` with its overridable construction and scheduling steps.

    The Optimizer calls the factories as hivemind 1.1.12 does: ``_make_progress_tracker(target_batch_size, **kw)``
    first, then ``_make_state_averager(**kw)``, then (without local updates) ``_make_gradient_averager(factory, **kw)``
    with ``grad_averager_factory`` as its one positional argument. The keywords are what the Optimizer's options say
    about that part (e.g. ``optimizer``, ``params``, ``scheduler``, ``compression`` and ``averager_opts`` for the
    state averager); the base methods add what every part shares (DHT, prefix derived from ``run_id``, matchmaking
    time, timeouts, client and auxiliary mode, ``start=True``). An override may call the class it wants with those,
    adding or dropping some. What this implementation needs besides, the Optimizer sets on the parts once they are
    built, whoever built them (``_connect_state_averager``, ``_connect_gradient_averager``).
    """

    # set by Optimizer.__init__ before the factories are called
    dht: Any
    _averager_opts: Dict[str, Any]  # the user's averager_opts (both averagers'; see _averager_opts_for)
    run_id: str
    scheduled_grads: Optional[StepControl]  # the gradient round booked for the end of this epoch, if any
    scheduled_state: Optional[StepControl]  # the state round booked for the end of this epoch, if any
    scheduled_state_epoch: int  # the epoch that round gathers (a round of another epoch is booked anew)

    @property
    def _averaging_limit(self) -> float:
        """averaging_timeout as a number of seconds (None, no limit, is infinite)."""
        return math.inf if self.averaging_timeout is None else self.averaging_timeout

    @staticmethod
    def _wait_limit(seconds: float) -> Optional[float]:
        """A limit for ``future.result(timeout)``: None (no limit) for an infinite number of seconds."""
        return None if math.isinf(seconds) else seconds

    @property
    def _wait_text(self) -> str:
        """How long a gradient round waits for its group, in words (for the logs)."""
        if math.isinf(self._averaging_limit):
            return "waiting for one as long as another peer of the run is alive (averaging_timeout: no limit)"
        return f"waiting for one up to averaging_timeout={self.averaging_timeout} s, then using local gradients"

    def _round_failure(self, control: StepControl, waited_out: bool, error: BaseException) -> str:
        """Why a gradient round gave no result (for the logs)."""
        if left_alone(control):
            return "no other peer of the run is left"
        return f"no result within averaging_timeout={self.averaging_timeout} s" if waited_out else repr(error)

    def _watch_if_unlimited(self, control: StepControl) -> StepControl:
        """With no averaging_timeout, cancel ``control`` once no other peer of the run is left (see round_watch)."""
        if math.isinf(self._averaging_limit):
            watch_unlimited_round(
                control, lambda: self.tracker.others_alive(WATCH_PERIOD), self.state_averager.is_alive, self.run_id
            )
        return control

    def is_alive(self) -> bool:
        """Whether the optimizer still runs its averagers (False once shut down)."""
        return self.state_averager.is_alive()

    def _check_kwargs(self, kwargs: Dict[str, Any]) -> None:
        """Check keyword arguments that a subclass forwards to ``Optimizer.__init__``: a name that the Optimizer
        does not know raises TypeError. Subclasses override it to refuse options they do not support."""
        base = next(cls for cls in type(self).__mro__ if cls.__module__ == "hivemind.optim.optimizer")
        unknown = sorted(set(kwargs) - set(inspect.signature(base.__init__).parameters) - {"self"})
        if unknown:
            raise TypeError(f"{type(self).__name__} got unknown keyword arguments {unknown}")

    def _shared_averager_kwargs(self) -> Dict[str, Any]:
        return dict(
            dht=self.dht, min_matchmaking_time=self.matchmaking_time, allreduce_timeout=self.allreduce_timeout,
            next_chunk_timeout=self.next_chunk_timeout, shutdown_timeout=self.shutdown_timeout,
            client_mode=self.client_mode, auxiliary=self.auxiliary, start=True,
        )  # fmt: skip

    def _averager_opts_for(self, averager: str) -> Dict[str, Any]:
        """The user's ``averager_opts`` that the ``"state"`` or ``"gradient"`` averager gets: all of them but those
        that only the other averager takes."""
        return averager_opts_for(self._averager_opts, averager)

    def _make_state_averager(self, **kwargs) -> TrainingStateAverager:
        """Build the averager of parameters and optimizer state (kwargs: ``optimizer``, ``params``, ``scheduler``,
        ``delta_rule_averaging``, ``average_opt_statistics``, ``extra_tensors``, ``compression``,
        ``state_compression``, ``performance_ema_alpha`` and the user's ``averager_opts``; a keyword given here
        replaces the Optimizer's own choice of it)."""
        options = dict(
            prefix=f"{self.run_id}_state_averager", offload_optimizer=self.offload_optimizer,
            custom_gradients=self.offload_optimizer and not self.use_local_updates,  # else: no averager fills them
            status_loglevel=self.status_loglevel, **self._shared_averager_kwargs(),
        )  # fmt: skip
        return TrainingStateAverager(**{**options, **kwargs})

    def _connect_state_averager(self) -> None:
        """With use_local_updates, epoch ends are not in step: a member one epoch behind averages as an equal
        (``max_epoch_spread`` at least 1), also in a state averager that an override built as 1.1.12's does."""
        if self.use_local_updates and isinstance(self.state_averager, TrainingStateAverager):
            self.state_averager.max_epoch_spread = max(1, self.state_averager.max_epoch_spread)

    def _make_gradient_averager(self, factory: Optional[Callable[..., GradientAverager]] = None, **kwargs):
        """Build the gradient averager over the state averager's ``main_parameters`` with ``factory`` (the
        Optimizer's ``grad_averager_factory``; None: GradientAverager). kwargs: ``reuse_grad_buffers`` and
        ``compression``. The factory gets what hivemind 1.1.12 gives it: ``parameters`` by keyword, the options shared
        by both averagers (``dht``, ``prefix``, matchmaking time, timeouts, ``client_mode``, ``auxiliary``,
        ``start=True``) and kwargs; and besides, unlike 1.1.12, the user's ``averager_opts`` but those only the state
        averager takes and those that a ``functools.partial`` factory sets itself (its own value wins)."""
        factory = GradientAverager if factory is None else factory
        options = dict(
            parameters=self.state_averager.main_parameters, prefix=f"{self.run_id}_grad_averager",
            **self._shared_averager_kwargs(),
        )  # fmt: skip
        fixed = factory.keywords if isinstance(factory, functools.partial) else {}
        opts = {name: value for name, value in self._averager_opts_for("gradient").items() if name not in fixed}
        _check_factory_takes(factory, opts)
        return factory(**{**options, **opts, **kwargs})

    def _connect_gradient_averager(self) -> None:
        """What the Optimizer needs of its gradient averager, however a factory or an override built it: with
        offload_optimizer, the offloaded parameters' ``.grad`` are the averager's averaged buffers (the optimizer
        steps on the average, as in 1.1.12); an auxiliary peer, which accumulates nothing, is not warned about that."""
        if self.auxiliary:
            self.grad_averager.warn = False
        if self.offload_optimizer:
            optimized = self.state_averager.optimizer_parameters
            with self.grad_averager.get_tensors() as averaged:
                if len(averaged) != len(optimized):
                    raise ValueError(
                        f"the gradient averager averages {len(averaged)} tensors for {len(optimized)} parameters: "
                        f"with offload_optimizer, build it over the state averager's main_parameters"
                    )
                for param, averaged_grad in zip(optimized, averaged):
                    param.grad = averaged_grad

    def _make_progress_tracker(self, target_batch_size: int, **kwargs) -> ProgressTracker:
        """Build the progress tracker (kwargs: ``performance_ema_alpha`` and the user's ``tracker_opts``)."""
        return ProgressTracker(
            dht=self.dht, prefix=self.run_id, target_batch_size=target_batch_size, client_mode=self.client_mode,
            status_loglevel=self.status_loglevel, start=True, **kwargs,
        )  # fmt: skip

    def _compute_schema_hash(self) -> int:
        """A hash of what is trained (shapes and dtypes of the parameters), taken at construction as
        ``_schema_hash``: a different value later means that parameters were replaced during training."""
        return hash(tuple((tuple(param.shape), param.dtype) for param in self.state_averager.main_parameters))

    @property
    def delay_before_state_averaging(self) -> PerformanceEMA:
        """Seconds from the start of an epoch's step to its state all-reduce (a moving average)."""
        return self.state_averager.delay_before_averaging

    # ------------------------------------------------------------------ booking rounds ahead of the end of an epoch

    def _maybe_schedule_gradient_averaging(self) -> None:
        """If this epoch ends within ``matchmaking_time``, start matchmaking for its gradient round."""
        if self.use_gradient_averaging:
            # (each member gathers its epoch: all of them land in the same one after the round)
            control = self._maybe_schedule(self.grad_averager, self.scheduled_grads, gather=self.local_epoch)
            self.scheduled_grads = control

    def _maybe_schedule_state_averaging(self) -> None:
        """If this epoch ends within ``matchmaking_time`` and the next one averages the state, start matchmaking."""
        new_epoch = next_epoch(self.local_epoch, self.tracker.global_progress.epoch)
        if new_epoch % self.average_state_every == 0:
            control = self._maybe_schedule(self.state_averager, self.scheduled_state, gather=new_epoch)
            if control is not self.scheduled_state:
                self.scheduled_state_epoch = new_epoch
            self.scheduled_state = control

    def _maybe_schedule(self, averager, control: Optional[StepControl], **kwargs) -> Optional[StepControl]:
        now, expected_peers = get_dht_time(), self._expected_peers()
        if is_pending(control):  # a leader that has every expected peer starts without waiting out its time
            control.expected_group_size = expected_peers
        eta = self.tracker.estimated_next_update_time
        if expected_peers <= 1 or not should_schedule_averaging(
            eta, now, self.matchmaking_time, already_scheduled=is_pending(control)
        ):
            return control
        timeout = max(self._averaging_limit, eta - now + self.matchmaking_time + 1)
        return self._try_schedule(averager, eta if eta > now else None, timeout, expected_peers, **kwargs)

    def _try_schedule(
        self, averager, scheduled_time: Optional[float], timeout: float, expected_peers: int, **kwargs
    ) -> Optional[StepControl]:
        try:
            control = averager.schedule_step(scheduled_time=scheduled_time, timeout=timeout, **kwargs)
            control.expected_group_size = expected_peers
            return self._watch_if_unlimited(control)
        except Exception as e:
            logger.warning(f"Could not pre-schedule an averaging round of {averager.prefix}: {e!r}")
            return None
