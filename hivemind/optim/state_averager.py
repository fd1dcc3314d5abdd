"""TrainingStateAverager: runs the inner optimizer and averages and shares parameters, statistics and epoch."""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeoutError
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch

from hivemind.averaging.averager import DecentralizedAverager
from hivemind.averaging.control import StepControl
from hivemind.averaging.payload import decode_group_gathered
from hivemind.averaging.shared_buffer import share_in_one_buffer
from hivemind.averaging.state_snapshot import packed_copy
from hivemind.compression import CompressionInfo, TensorRole  # noqa: F401 (TensorRole: imported from here in 1.1.12)
from hivemind.dht import DHT
from hivemind.optim.epoch_rule import MAX_EPOCH, state_round_epochs, state_round_weight
from hivemind.optim.optimizer_options import SharedEpochSpread, check_state_averager_arguments
from hivemind.optim.optimizer_state import (
    dump_optimizer_state,
    initialize_optimizer_state_,
    load_optimizer_state,
    shared_state_infos,
)
from hivemind.optim.optimizer_torch_api import as_param_groups, frozen_gradients_hidden
from hivemind.optim.scheduler_sync import SchedulerStart, catch_up_scheduler, is_scheduler_instance
from hivemind.optim.state_averager_compat import StateAveragerPublicNames
from hivemind.optim.state_loading import (
    apply_downloaded_state_,
    load_first_accepted_state,
    load_state_without_statistics,
)
from hivemind.optim.state_lock import GradientHandover, refuse_to_wait_under_the_lock, work_waiting_for_the_lock
from hivemind.optim.state_tensors import TrainingStateTensors
from hivemind.utils.logging import get_logger
from hivemind.utils.performance_ema import PerformanceEMA

__all__ = [
    "TrainingStateAverager", "initialize_optimizer_state_", "dump_optimizer_state", "load_optimizer_state",
    "TorchOptimizer", "OptimizerFactory", "SchedulerFactory", "LRSchedulerBase", "Parameters", "ParamGroups",
]  # fmt: skip

logger = get_logger(__name__)

# seconds a download of the state waits for the optimizer step of the epoch just ended (the newcomer then retries)
STATE_READY_TIMEOUT = 20.0

TorchOptimizer = torch.optim.Optimizer
OptimizerFactory = Callable[[Iterable[Dict[str, Any]]], TorchOptimizer]
SchedulerFactory = Callable[[TorchOptimizer], Any]
LRSchedulerBase = torch.optim.lr_scheduler.LRScheduler  # base class of torch's LR schedulers (for isinstance checks)
Parameters = Iterable[torch.Tensor]
ParamGroups = Iterable[Dict[str, Any]]


class TrainingStateAverager(StateAveragerPublicNames, TrainingStateTensors, DecentralizedAverager):
    """
    Holds the training state of one peer (parameters, optimizer statistics, extra tensors, epoch), runs the inner
    optimizer, averages that state with peers and serves it to newcomers. The state sent on download is
    ``{"epoch", "group_bits", "optimizer_metadata"}`` plus tensors: optimizer parameters, extra tensors, then the
    optimizer's state tensors.

    :param optimizer: a torch optimizer, or a factory ``callable(param_groups) -> optimizer`` (then ``params`` is
      required); the factory form is needed for ``offload_optimizer``
    :param params: parameters or param groups of the model (with an optimizer factory)
    :param scheduler: an LR scheduler, or a factory ``callable(optimizer)`` (required form with an optimizer factory);
      stepped so that it counts one step per epoch
    :param initialize_optimizer: create the optimizer's statistics right away (default: if it has none yet)
    :param offload_optimizer: keep the optimizer and a copy of the parameters in CPU shared memory; the model's
      parameters get the new values when the step is applied
    :param custom_gradients: with offloading, the caller puts gradients into the offloaded parameters itself
    :param reuse_tensors: accepted for compatibility; averaged tensors are always separate buffers here (see
      ``reuse_tensors`` and the other names of :class:`StateAveragerPublicNames`)
    :param delta_rule_averaging: apply the averaging result as a delta (average - values sent), keeping local updates
      made while averaging ran in the background
    :param performance_ema_alpha: smoothing of ``delay_before_averaging`` (seconds from step() to its all-reduce)
    :param sync_epoch_when_averaging: after a round, move to the highest epoch of the group
    :param parameter_names: names of the parameters, for logs
    :param average_opt_statistics: names of optimizer-state entries to average (e.g. ``"exp_avg_sq"``)
    :param extra_tensors: more tensors to average and share (e.g. batchnorm statistics)
    :param status_loglevel: level of the per-round log lines
    :param max_epoch_spread: members this many epochs behind the latest one average as equals (else with weight 0)
    :param averager_kwargs: options of :class:`DecentralizedAverager` (``prefix`` among them)
    """

    # fmt: off
    def __init__(
        self, *, dht: DHT, optimizer: Union[TorchOptimizer, OptimizerFactory],
        params: Optional[Union[Parameters, ParamGroups]] = None,
        scheduler: Optional[Union[Any, SchedulerFactory]] = None,
        initialize_optimizer: Optional[bool] = None, offload_optimizer: bool = False, custom_gradients: bool = False,
        reuse_tensors: Optional[bool] = None, delta_rule_averaging: bool = False, performance_ema_alpha: float = 0.1,
        sync_epoch_when_averaging: bool = False, parameter_names: Optional[Sequence[str]] = None,
        average_opt_statistics: Sequence[str] = (), extra_tensors: Sequence[torch.Tensor] = (),
        status_loglevel: int = logging.DEBUG, max_epoch_spread: int = 0, **averager_kwargs,
    ):
        # fmt: on
        if not isinstance(average_opt_statistics, str):  # (iterators, e.g. model.buffers(), are read only once)
            average_opt_statistics = tuple(average_opt_statistics)
        extra_tensors = tuple(extra_tensors)
        optimizer_is_factory = check_state_averager_arguments(
            optimizer, params, scheduler, offload_optimizer, custom_gradients, average_opt_statistics, extra_tensors
        )

        param_groups = as_param_groups(params) if optimizer_is_factory else optimizer.param_groups
        self.main_parameters: Tuple[torch.Tensor, ...] = tuple(p for group in param_groups for p in group["params"])
        if not self.main_parameters:
            raise ValueError("TrainingStateAverager needs at least one parameter")
        self.parameter_names = tuple(parameter_names or (f"param{i}" for i in range(len(self.main_parameters))))
        self.offload_optimizer = offload_optimizer
        self.custom_gradients = custom_gradients
        self.delta_rule_averaging, self.sync_epoch_when_averaging = delta_rule_averaging, sync_epoch_when_averaging
        self.status_loglevel = status_loglevel
        if offload_optimizer:
            offloaded = {p: self._make_offloaded_copy(p) for p in self.main_parameters}
            share_in_one_buffer(list(offloaded.values()))  # one shared buffer: one fd, not one per parameter
            param_groups = [dict(group, params=[offloaded[p] for p in group["params"]]) for group in param_groups]
        self.optimizer = optimizer(param_groups) if optimizer_is_factory else optimizer
        self._optimizer_parameters: Tuple[torch.Tensor, ...] = tuple(
            p for group in self.optimizer.param_groups for p in group["params"]
        )
        if len(self._optimizer_parameters) != len(self.main_parameters):
            raise ValueError("the optimizer factory must keep every parameter it was given, in order")
        if initialize_optimizer is None:
            initialize_optimizer = not self.optimizer.state
        if initialize_optimizer:
            initialize_optimizer_state_(self.optimizer)
        if scheduler is not None and not is_scheduler_instance(scheduler):
            scheduler = scheduler(self.optimizer)
        self.scheduler = scheduler
        self.scheduler_start = SchedulerStart(self.optimizer, scheduler)  # to rewind it to an earlier checkpoint
        self.extra_tensors = tuple(tensor.detach() for tensor in extra_tensors)
        self.average_opt_statistics = tuple(average_opt_statistics)
        self.local_epoch = 0
        self._max_epoch_spread = SharedEpochSpread.make(max_epoch_spread, averager_kwargs.get("start_method"))
        self.round_met_later_epochs = False  # a refused round had peers of later epochs (the caller clears it)

        sources = self._averaging_sources()
        with torch.no_grad():
            averaged = tuple(t.detach().to("cpu", copy=True) for t in sources)  # shared in one buffer by the averager
        infos = self._tensor_infos(sources)
        self._state_lock = threading.RLock()  # consistent state for downloads while steps are applied
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{type(self).__name__}.background")
        self._pending_step: Optional[Future] = None
        self._pending_averaging: Optional[Future] = None
        self._round_state_read: Optional[threading.Event] = None  # of the background round: set once it read it
        self._state_ready = threading.Event()  # clear while local_epoch is ahead of the parameters: see move_to_epoch
        self._state_ready.set()
        self._round_control: Optional[StepControl] = None  # of the latest averaging round (to cancel on shutdown)
        self._cancel_rounds = False  # set on shutdown: rounds that start from then on are cancelled at once
        self.delay_before_averaging = PerformanceEMA(alpha=performance_ema_alpha)  # seconds: step() -> all-reduce
        super().__init__(averaged_tensors=averaged, dht=dht, tensor_infos=infos, **averager_kwargs)

    max_epoch_spread = SharedEpochSpread()  # (read by the averager's process too: a new value applies to next rounds)
    # what only the user's process uses: the model, the optimizer and its scheduler (maybe on a GPU, maybe built by
    # lambdas), the lock and thread that apply steps. A spawned averager process is sent the rest (see __getstate__)
    _USER_PROCESS_ONLY = (
        "main_parameters", "optimizer", "_optimizer_parameters", "scheduler", "extra_tensors", "_state_lock",
        "_executor", "_pending_step", "_pending_averaging", "_round_state_read", "delay_before_averaging",
        "_state_ready", "scheduler_start",
    )  # fmt: skip

    def __getstate__(self) -> Dict[str, Any]:
        """What a spawned (or forkserver) averager process receives: the averaging side only, with the averaged
        tensors in shared memory; nothing of the model or the optimizer, so no GPU tensor reaches that process."""
        state = super().__getstate__()
        for name in self._USER_PROCESS_ONLY:
            state.pop(name, None)
        return state

    # ------------------------------------------------------------------ the step

    @property
    def optimizer_parameters(self) -> Tuple[torch.Tensor, ...]:
        """The tensors the inner optimizer updates: CPU copies with offload_optimizer, else the model's parameters."""
        return self._optimizer_parameters

    def move_to_epoch(self, epoch: int, step_follows: bool) -> None:
        """Set ``local_epoch``. With ``step_follows``, the optimizer step of the epoch that ended comes in the next
        step(): until it has run, downloads of the state wait for it (not the new epoch with the old parameters)."""
        if step_follows:
            self._state_ready.clear()
        self.local_epoch = epoch

    def wait_for_background_step(self) -> None:
        """Wait until a delayed optimizer step (if any) has finished; its result is applied at the next step()."""
        pending = self._pending_step
        refuse_to_wait_under_the_lock(work_waiting_for_the_lock(self._state_lock, pending, None, None), "this call")
        if pending is not None:
            pending.exception()

    def submit_background(self, function: Callable[..., Any], *args) -> Future:
        """Run ``function(*args)`` in the background thread, after the background work already queued."""
        return self._executor.submit(function, *args)

    def cancel_background_averaging(self, timeout: float, *controls: Optional[StepControl]) -> None:
        """
        Wait up to ``timeout`` seconds for the background work to end, then cancel its averaging rounds: this
        averager's, those that start later, and ``controls`` (rounds a background step waits for). For a shutdown,
        which must not wait for peers that are gone; background optimizer steps still finish.
        """
        deadline = time.monotonic() + timeout
        for pending in (self._pending_step, self._pending_averaging):
            try:
                if pending is not None:
                    pending.exception(max(0.0, deadline - time.monotonic()))
            except FutureTimeoutError:
                pass
        self._cancel_rounds = True
        for control in (self._round_control, *controls):
            if control is not None and not control.done():
                control.cancel()

    @property
    def averaging_in_progress(self) -> bool:
        return self._pending_averaging is not None and not self._pending_averaging.done()

    # fmt: off
    def step(
        self, wait_for_delayed_updates: Optional[bool] = None, apply_delayed_updates: bool = True,
        increment_epoch: bool = False, optimizer_step: bool = False, zero_grad: bool = False,
        delay_optimizer_step: bool = False, averaging_round: bool = False, delay_averaging: Optional[bool] = None,
        averaging_control: Optional[StepControl] = None, wait_for_trigger: Optional[Callable[[], Any]] = None,
        grad_scaler: Optional[Any] = None, set_to_none: bool = True, averaging_opts: Optional[Dict[str, Any]] = None,
    ) -> None:
        # fmt: on
        """
        Perform, in this order: wait for background work (default: if anything new is requested), apply finished
        background results to the model, bump the epoch, run the optimizer (maybe in the background), zero the
        gradients, bring the scheduler to the epoch, run an averaging round (maybe in the background). An optimizer
        step run here or a zero_grad waits for an unfinished delayed step even without wait_for_delayed_updates; a
        delayed step queued behind another gets a copy of its gradients. Waiting under lock_optimizer for work that
        needs it raises RuntimeError (see docs/optimizer.md).
        """
        started = time.perf_counter()  # an averaging round's delay_before_averaging is measured from here
        if delay_averaging is None:
            delay_averaging = delay_optimizer_step
        if delay_optimizer_step and not self.offload_optimizer:
            raise ValueError("delay_optimizer_step requires offload_optimizer (the step runs on the CPU copies)")
        if averaging_control is not None and not averaging_round:
            raise ValueError("averaging_control is only used with averaging_round=True")
        if wait_for_delayed_updates is None:
            wait_for_delayed_updates = optimizer_step or zero_grad or averaging_round
        if wait_for_delayed_updates:
            waiting_for = work_waiting_for_the_lock(
                self._state_lock, self._pending_step, self._pending_averaging, self._round_state_read
            )
            refuse_to_wait_under_the_lock(waiting_for, "step()")
            for pending in (self._pending_step, self._pending_averaging):
                if pending is not None:
                    pending.exception()  # wait; failures are reported when applied
        if apply_delayed_updates:
            self._apply_finished_background_work()
        if increment_epoch:
            self.local_epoch += 1

        if (optimizer_step and not delay_optimizer_step) or (zero_grad and not optimizer_step):
            self.wait_for_background_step()  # (even if told not to wait: the steps run in order, on their gradients)
        if optimizer_step:
            earlier, handover = self._pending_step, None
            if earlier is not None and not earlier.done() and self.offload_optimizer and not self.custom_gradients:
                handover = GradientHandover(self.main_parameters)  # (the earlier step reads the gradient buffers)
            else:
                self._load_gradients_into_optimizer()
            if zero_grad and self.offload_optimizer:
                self.zero_model_grads(set_to_none)
            if delay_optimizer_step:
                self._pending_step = self._executor.submit(
                    self._run_optimizer_step, grad_scaler, zero_grad, set_to_none, handover
                )
                if earlier is not None:  # (replaced before it was applied: its failure is still reported)
                    earlier.add_done_callback(_log_failed_step)
            else:
                self._run_optimizer_step(grad_scaler, zero_grad, set_to_none)
                self._copy_optimizer_parameters_to_model()
        elif zero_grad:
            self.zero_model_grads(set_to_none)
            self.optimizer.zero_grad(set_to_none=set_to_none)
        if self._pending_step is None:  # (else the background step does both once it has used its learning rate)
            self._update_scheduler()
            self._state_ready.set()

        if averaging_round:
            opts = dict(averaging_opts or {})
            if delay_averaging:
                self._round_state_read = state_read = threading.Event()
                self._pending_averaging = self._executor.submit(
                    self._run_averaging_round, averaging_control, wait_for_trigger, opts, started, False, state_read
                )
            else:
                # a delayed step may land while this round runs: apply the round as a delta, keeping that step
                step_in_flight = self._pending_step is not None
                self._pending_averaging = Future()
                try:
                    self._pending_averaging.set_result(
                        self._run_averaging_round(averaging_control, wait_for_trigger, opts, started, step_in_flight)
                    )
                except Exception as e:
                    self._pending_averaging.set_exception(e)
                self._apply_finished_background_work()
        elif averaging_control is not None:
            averaging_control.cancel()

    def _run_optimizer_step(
        self, grad_scaler: Optional[Any], zero_grad: bool, set_to_none: bool,
        handover: Optional[GradientHandover] = None,
    ) -> None:
        try:
            with self._state_lock:
                if handover is not None:  # (loaded under the same hold as the step: nothing comes in between)
                    handover.load_into(self._optimizer_parameters)
                with frozen_gradients_hidden(self.main_parameters, self._optimizer_parameters):
                    if grad_scaler is not None:
                        with grad_scaler.running_global_step():
                            grad_scaler.unscale_(self.optimizer)
                            grad_scaler.step(self.optimizer)
                    else:
                        self.optimizer.step()
                    if zero_grad:
                        self.optimizer.zero_grad(set_to_none=set_to_none)
                    self._update_scheduler()  # (only now: the step used the learning rate of the epoch it ends)
        finally:
            self._state_ready.set()  # (a failed step leaves the parameters as they are: serve them)

    def _update_scheduler(self) -> None:
        """Step the LR scheduler until it counts ``local_epoch`` epochs (a subclass may drive its own schedulers)."""
        catch_up_scheduler(self.scheduler, self.local_epoch)

    def _run_averaging_round(
        self, control: Optional[StepControl], wait_for_trigger: Optional[Callable[[], Any]], opts: Dict[str, Any],
        started: float, keep_values_sent: bool = False, state_read: Optional[threading.Event] = None,
    ) -> Tuple[Dict[Any, Any], List[torch.Tensor], int]:
        """
        Send the current state to the averager and run one round; returns (gathered, values sent, epoch sent). The
        values sent are kept (for a delta update) with delta_rule_averaging or ``keep_values_sent``.
        """
        round_epoch = self.local_epoch
        keep_values_sent = keep_values_sent or self.delta_rule_averaging
        with torch.no_grad(), self._state_lock, self.get_tensors() as averaged:
            sent = []
            for buffer, source in zip(averaged, self._averaging_sources()):
                buffer.copy_(source, non_blocking=True)
                sent.append(buffer.clone() if keep_values_sent else None)
            if state_read is not None:
                state_read.set()  # (under the lock: a step under lock_optimizer may now wait for this round)
        if wait_for_trigger is not None:
            wait_for_trigger()
        if control is None:
            control = self.schedule_step(**opts)
        self._round_control = control
        self.delay_before_averaging.update(task_size=1, interval=time.perf_counter() - started)
        if self._cancel_rounds:  # (shutting down)
            control.cancel()
        else:
            control.allow_allreduce()
        gathered = control.result()
        return gathered, sent, round_epoch

    def schedule_step(self, scheduled_time: Optional[float] = None, **kwargs) -> StepControl:
        """Book an averaging round in advance: matchmaking starts now, the all-reduce waits for the step."""
        kwargs.setdefault("gather", self.local_epoch)
        return DecentralizedAverager.step(
            self, scheduled_time=scheduled_time, wait=False, require_trigger=True, **kwargs
        )

    @torch.no_grad()
    def _apply_finished_background_work(self) -> None:
        if self._pending_step is not None and self._pending_step.done():
            pending, self._pending_step = self._pending_step, None
            if pending.exception() is not None:
                logger.error(f"The background optimizer step failed: {pending.exception()!r}")
            else:
                self._copy_optimizer_parameters_to_model()
        if self._pending_averaging is not None and self._pending_averaging.done():
            pending, self._pending_averaging = self._pending_averaging, None
            if pending.exception() is not None:
                logger.warning(f"Averaging the training state failed, keeping local values: {pending.exception()!r}")
                return
            gathered, sent, round_epoch = pending.result()
            epochs = state_round_epochs(gathered.values())
            if self.sync_epoch_when_averaging:
                self._apply_averaged_state(sent)
                self.local_epoch = max([self.local_epoch, *epochs])
                self._update_scheduler()
            elif not self._epochs_agree(epochs, len(gathered), round_epoch):
                # a member behind the others averaged with weight 0 (see _aggregate_with_group) and keeps its own
                # state, catching up by gradient rounds or downloads; the members in step apply their average
                self.round_met_later_epochs = max(epochs, default=round_epoch) > round_epoch
                logger.log(
                    self.status_loglevel,
                    f"Not applying a state average of peers at epochs {sorted(epochs)} (this peer sent epoch "
                    f"{round_epoch} and is at epoch {self.local_epoch})",
                )
                return
            else:
                self._apply_averaged_state(sent)
            logger.log(self.status_loglevel, f"Averaged the training state with {len(gathered)} peers")

    def _epochs_agree(self, epochs: List[int], group_size: int, round_epoch: int) -> bool:
        """Whether this peer uses a round's result: it is still in the epoch it sent, every member sent an epoch, and
        none is more than ``max_epoch_spread`` ahead of this peer (members behind it averaged with weight 0)."""
        if len(epochs) != group_size or round_epoch != self.local_epoch:
            return False
        return max(epochs + [round_epoch]) - round_epoch <= self.max_epoch_spread

    async def _aggregate_with_group(self, group_info: Any, weight: float) -> Dict[Any, Any]:
        """(In the averager's process) a member behind the latest epoch averages with weight 0 (sync_epoch: none)."""
        _, gathered = decode_group_gathered(group_info.peer_ids, group_info.gathered)
        spread = MAX_EPOCH if self.sync_epoch_when_averaging else self.max_epoch_spread
        weight = state_round_weight(gathered.get(self._p2p.peer_id), gathered.values(), weight, spread)
        return await super()._aggregate_with_group(group_info, weight)

    def _apply_averaged_state(self, sent: Sequence[Optional[torch.Tensor]]) -> None:
        with self._state_lock, self.get_tensors() as averaged:
            for source, result, before in zip(self._averaging_sources(), averaged, sent):
                if before is not None:  # keep the local changes made since the values were sent
                    source.add_(result.to(source.device) - before.to(source.device))
                else:
                    source.copy_(result, non_blocking=True)
        self._copy_optimizer_parameters_to_model()

    # ------------------------------------------------------------------ state sharing

    def get_current_state(self) -> Tuple[Dict[str, Any], List[torch.Tensor], List[CompressionInfo]]:
        if not self._state_ready.is_set() and self._state_lock._is_owned():  # (no step can end while it is held)
            refuse_to_wait_under_the_lock("the optimizer step that ends the epoch", "get_current_state()")
        if not self._state_ready.wait(STATE_READY_TIMEOUT):
            raise TimeoutError(
                f"the optimizer step that ends epoch {self.local_epoch - 1} is still running after "
                f"{STATE_READY_TIMEOUT} s; the state is served once it is done (the newcomer may retry)"
            )
        with torch.no_grad(), self._state_lock:  # one copy, straight into the shared block the averager streams
            flat_optimizer_state, optimizer_tensors = dump_optimizer_state(self.optimizer)
            num_params, num_extras = len(self._optimizer_parameters), len(self.extra_tensors)
            tensors = packed_copy([*self._optimizer_parameters, *self.extra_tensors, *optimizer_tensors])
            epoch = self.local_epoch
        metadata = {"epoch": epoch, "group_bits": self.get_group_bits(), "optimizer_metadata": flat_optimizer_state}
        return metadata, tensors, shared_state_infos(tensors, num_params, num_extras)

    def load_state_from_peers(self, **kwargs) -> Optional[Tuple[Dict[str, Any], List[torch.Tensor]]]:
        """
        Download the training state from the best peer and apply it all at once (parameters, optimizer state, extra
        tensors, epoch). A state that does not fit (other shapes, optimizer or options), or whose epoch is behind the
        local one, is refused with a warning and nothing changes. Returns (metadata, tensors), or None.
        """
        if self._state_lock._is_owned() and type(self).get_current_state is TrainingStateAverager.get_current_state:
            # (the download checks donors against this peer's own state, read by another thread under the lock)
            refuse_to_wait_under_the_lock("reading this peer's own state, which downloads are checked against,",
                                          "load_state_from_peers()")  # fmt: skip
        if not self.optimizer.state:  # (initialize_optimizer=False): donors may share statistics or none
            num_local = len(self._optimizer_parameters) + len(self.extra_tensors)
            return load_state_without_statistics(
                self, self.optimizer, self._state_lock, self._apply_downloaded_state, num_local, **kwargs
            )
        return load_first_accepted_state(self, self._apply_downloaded_state, **kwargs)

    def _apply_downloaded_state(self, metadata: Any, tensors: List[torch.Tensor]) -> None:
        apply_downloaded_state_(self, metadata, tensors)

    def shutdown(self) -> None:
        self._state_ready.set()  # a cancelled step never comes: let no download wait for it
        self._executor.shutdown(wait=False)
        for pending in (self._pending_step, self._pending_averaging):
            if pending is not None:
                pending.cancel()
        super().shutdown()


def _log_failed_step(step: Future) -> None:
    if not step.cancelled() and step.exception() is not None:
        logger.error(f"The background optimizer step failed: {step.exception()!r}")
