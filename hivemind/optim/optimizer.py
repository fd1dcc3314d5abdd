"""hivemind.Optimizer: wraps a torch optimizer so that peers sharing a run_id train one model together."""

from __future__ import annotations

import concurrent.futures
import logging
import time
from typing import Any, Callable, Dict, Optional, Sequence

import torch

from hivemind.averaging.control import AveragingStage, StepControl
from hivemind.compression import CompressionBase, NoCompression
from hivemind.dht import DHT
from hivemind.optim.epoch_rule import epoch_after_gradient_round, is_synchronized, next_epoch, should_load_state
from hivemind.optim.grad_averager import GradientAverager, GradientAveragerFactory
from hivemind.optim.grad_scaler import GradScaler
from hivemind.optim.optimizer_hooks import OptimizerHooks
from hivemind.optim.optimizer_options import check_dht, check_not_shut_down, check_step_arguments, resolve_options
from hivemind.optim.optimizer_torch_api import load_training_state_dict_, model_param_groups, training_state_dict
from hivemind.optim.progress_bar import EpochProgressBar
from hivemind.optim.progress_tracker import LocalTrainingProgress
from hivemind.optim.state_loading import check_load_state_arguments, load_state_with_retries
from hivemind.utils.logging import get_logger

__all__ = ["Optimizer"]

logger = get_logger(__name__)


class Optimizer(OptimizerHooks, torch.optim.Optimizer):
    """
    Collaborative training: peers with the same ``run_id`` accumulate gradients until the swarm has processed
    ``target_batch_size`` samples, then average them, apply the same optimizer step and move to the next epoch.
    Between epochs, ``.step()`` only accumulates (parameters do not change unless ``use_local_updates=True``).
    See docs/optimizer.md for a walkthrough and what each option trades; subclasses may replace the parts it builds
    (``_make_state_averager`` etc., see :mod:`hivemind.optim.optimizer_hooks`).

    :param dht: a running DHT
    :param run_id: name of the run (prefix of every DHT key it uses)
    :param target_batch_size: samples the whole swarm processes per epoch
    :param batch_size_per_step: samples behind one local ``.step()`` (or pass ``step(batch_size=...)``)
    :param optimizer: a factory ``lambda params: torch.optim.X(params, ...)`` (with ``params``), or a built optimizer
    :param params: the model's parameters or param groups, with an optimizer factory
    :param scheduler: LR scheduler or factory ``lambda opt: ...``; stepped once per epoch
    :param matchmaking_time: seconds spent gathering peers for each averaging round
    :param averaging_timeout: an averaging round is abandoned after this many seconds (None or inf: no limit)
    :param allreduce_timeout: limit of one all-reduce (default: averaging_timeout)
    :param next_chunk_timeout: per-message timeout in all-reduce (default: matchmaking_time)
    :param load_state_timeout: limit of downloading the state from peers, seconds
    :param reuse_grad_buffers: accumulate in ``param.grad`` (do not call zero_grad then)
    :param offload_optimizer: keep the optimizer and a copy of the parameters in CPU shared memory
    :param delay_optimizer_step: run the optimizer step in the background, apply it at a later ``.step()``
    :param delay_grad_averaging: also average gradients in the background
    :param delay_state_averaging: average parameters in the background
    :param average_state_every: average parameters every this many epochs
    :param use_local_updates: apply the optimizer at every step with local gradients; average parameters per epoch
    :param client_mode: ignored: the averagers and tracker follow the DHT's client mode
    :param auxiliary: help others average without training
    :param grad_compression: compression of gradient all-reduce
    :param grad_averager_factory: e.g. ``partial(PowerSGDGradientAverager, averager_rank=32)``; a keyword that such
      a partial sets wins over the same one in averager_opts
    :param state_averaging_compression: compression of parameter averaging
    :param load_state_compression: compression of state downloads served by this peer
    :param average_opt_statistics: optimizer-state entries averaged with the parameters (e.g. ``"exp_avg_sq"``)
    :param extra_tensors: more tensors averaged and shared with the parameters
    :param averager_opts: more options of both averagers (e.g. ``bandwidth``, ``target_group_size``); one that only
      one averager takes (e.g. ``sync_epoch_when_averaging``, ``accumulate_grads_on``) goes to it alone
    :param tracker_opts: more options of the ProgressTracker
    :param performance_ema_alpha: smoothing of the speed estimate
    :param shutdown_timeout: seconds to wait for background parts to stop
    :param verbose: a progress bar and log lines at INFO (else DEBUG)
    """

    # fmt: off
    def __init__(
        self, *, dht: DHT, run_id: str, target_batch_size: int, batch_size_per_step: Optional[int] = None,
        optimizer: Any, params: Optional[Any] = None, scheduler: Optional[Any] = None, matchmaking_time: float = 15.0,
        averaging_timeout: Optional[float] = 60.0, allreduce_timeout: Optional[float] = None,
        next_chunk_timeout: Optional[float] = None, load_state_timeout: float = 600.0,
        reuse_grad_buffers: bool = False, offload_optimizer: Optional[bool] = None,
        delay_optimizer_step: Optional[bool] = None, delay_grad_averaging: bool = False,
        delay_state_averaging: bool = True, average_state_every: int = 1, use_local_updates: bool = False,
        client_mode: Optional[bool] = None, auxiliary: bool = False,
        grad_compression: CompressionBase = NoCompression(),
        grad_averager_factory: Optional[GradientAveragerFactory] = None,
        state_averaging_compression: CompressionBase = NoCompression(),
        load_state_compression: CompressionBase = NoCompression(),
        average_opt_statistics: Sequence[str] = (), extra_tensors: Sequence[torch.Tensor] = (),
        averager_opts: Optional[Dict[str, Any]] = None, tracker_opts: Optional[Dict[str, Any]] = None,
        performance_ema_alpha: float = 0.1, shutdown_timeout: float = 5, verbose: bool = False,
    ):
        check_dht(dht)
        if client_mode is not None and client_mode != dht.client_mode:
            logger.warning(f"client_mode={client_mode} is ignored: this peer follows the DHT's client mode "
                           f"({dht.client_mode}); start the DHT with client_mode={client_mode} instead")
        client_mode = dht.client_mode
        options = resolve_options(
            run_id=run_id, target_batch_size=target_batch_size, batch_size_per_step=batch_size_per_step,
            optimizer=optimizer, params=params, scheduler=scheduler, matchmaking_time=matchmaking_time,
            averaging_timeout=averaging_timeout, allreduce_timeout=allreduce_timeout,
            next_chunk_timeout=next_chunk_timeout, reuse_grad_buffers=reuse_grad_buffers,
            offload_optimizer=offload_optimizer, delay_optimizer_step=delay_optimizer_step,
            delay_grad_averaging=delay_grad_averaging, average_state_every=average_state_every,
            use_local_updates=use_local_updates, client_mode=client_mode, auxiliary=auxiliary,
            grad_averager_factory=grad_averager_factory, load_state_timeout=load_state_timeout,
            averager_opts=averager_opts,
        )
        # fmt: on
        self.dht, self.run_id, self.target_batch_size = dht, run_id, target_batch_size
        self.batch_size_per_step, self.client_mode, self.auxiliary = batch_size_per_step, client_mode, auxiliary
        self.matchmaking_time, self.averaging_timeout = matchmaking_time, averaging_timeout
        self.allreduce_timeout, self.next_chunk_timeout = options.allreduce_timeout, options.next_chunk_timeout
        self.grad_averager_factory = grad_averager_factory
        self.load_state_timeout, self.shutdown_timeout = float(load_state_timeout), float(shutdown_timeout)
        self.reuse_grad_buffers, self.offload_optimizer = reuse_grad_buffers, options.offload_optimizer
        self.delay_optimizer_step = options.delay_optimizer_step
        self.delay_grad_averaging = options.delay_grad_averaging
        self.delay_state_averaging, self.average_state_every = delay_state_averaging, int(average_state_every)
        self._use_local_updates = use_local_updates
        self.status_loglevel = logging.DEBUG if not verbose else logging.INFO
        self._progress_bar = EpochProgressBar(run_id, enabled=verbose)

        self._averager_opts = dict(averager_opts or {})  # (both averagers'; see _averager_opts_for)
        self.scheduled_grads: Optional[StepControl] = None
        self.scheduled_state: Optional[StepControl] = None
        self.scheduled_state_epoch = 0
        self.tracker = self._make_progress_tracker(  # (first, as in hivemind 1.1.12: the averagers' hooks may use it)
            target_batch_size, performance_ema_alpha=performance_ema_alpha, **(tracker_opts or {})
        )
        try:  # (if a later part cannot start, the parts started so far are stopped)
            self.state_averager = self._make_state_averager(
                optimizer=optimizer, params=params, scheduler=scheduler,
                delta_rule_averaging=use_local_updates and delay_state_averaging,
                average_opt_statistics=average_opt_statistics, extra_tensors=extra_tensors,
                compression=state_averaging_compression, state_compression=load_state_compression,
                performance_ema_alpha=performance_ema_alpha, **self._averager_opts_for("state"),
            )  # fmt: skip
            self._connect_state_averager()
            self.grad_averager: Optional[GradientAverager] = None
            if not use_local_updates:
                self.grad_averager = self._make_gradient_averager(  # (the factory goes first, by position)
                    grad_averager_factory, compression=grad_compression, reuse_grad_buffers=reuse_grad_buffers
                )
                self._connect_gradient_averager()
            self._schema_hash = self._compute_schema_hash()  # (a seam too: a subclass's may fail)
        except BaseException:
            for averager in (getattr(self, "grad_averager", None), getattr(self, "state_averager", None)):
                if averager is not None:
                    averager.shutdown()
            self.tracker.shutdown(self.shutdown_timeout)
            raise
        self._local_samples = 0  # samples of this epoch (local-updates mode; gradient mode asks the averager)
        self._background_grad_round: Optional[StepControl] = None  # with delay_grad_averaging (cancelled on shutdown)
        self._should_check_synchronization_on_update = True  # (once per epoch: see _should_load_state_from_peers)
        self._shut_down, self._last_progress_bar_update = False, 0.0
        self._last_round_peers: Optional[set] = None  # raw peer ids of the last gradient round (None: none yet)
        self._last_round_epochs: list = []  # the epochs its members gathered

    # ------------------------------------------------------------------ properties

    @property
    def local_epoch(self) -> int:
        """The epoch this peer is in (synchronized with the swarm at every global step)."""
        return self.state_averager.local_epoch

    @property
    def local_progress(self) -> LocalTrainingProgress:
        return self.tracker.local_progress

    @property
    def use_local_updates(self) -> bool:
        return self._use_local_updates

    @property
    def use_gradient_averaging(self) -> bool:
        return not self._use_local_updates

    @property
    def ready_to_update_epoch(self) -> bool:
        return self.tracker.ready_to_update_epoch

    def is_synchronized_with_peers(self) -> bool:
        return is_synchronized(self.local_epoch, self.tracker.global_epoch)

    @property
    def opt(self) -> torch.optim.Optimizer:
        """The wrapped torch optimizer."""
        return self.state_averager.optimizer

    @property
    def param_groups(self):
        """The inner optimizer's param groups, pointing at the model's parameters."""
        return model_param_groups(self.opt, self.state_averager.main_parameters)  # (settings write through)

    @property
    def state(self) -> Dict[Any, Any]:
        return dict(self.opt.state, local_epoch=self.local_epoch)

    @property
    def defaults(self) -> Dict[str, Any]:
        return self.opt.defaults

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        raise ValueError(
            f"{type(self).__name__} does not support add_param_group: all peers must train the same "
            f"parameters; create the optimizer with every param group from the start"
        )

    def state_dict(self) -> Dict[str, Any]:
        self.state_averager.wait_for_background_step()  # a delayed step lands in the model first (in place, also in
        self.state_averager.step()  # its state_dict() taken before), so that they hold the epoch saved here
        return training_state_dict(self.opt, self.local_epoch)

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Load a ``state_dict()``: optimizer state and epoch. It holds no parameters: load the model's first."""
        self._cancel_scheduled_rounds()
        load_training_state_dict_(self.state_averager, state_dict)
        with self.tracker.pause_updates():
            self._restart_epoch()

    # ------------------------------------------------------------------ training

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self.reuse_grad_buffers:
            raise ValueError(
                "with reuse_grad_buffers=True, gradients accumulate in param.grad and the optimizer "
                "zeroes them after each epoch: do not call zero_grad() yourself"
            )
        self.state_averager.zero_model_grads(set_to_none)

    def step(  # fmt: skip
        self, closure: Optional[Callable[[], torch.Tensor]] = None, batch_size: Optional[int] = None,
        grad_scaler: Optional[GradScaler] = None,
    ):
        """
        Report ``batch_size`` more samples processed with the current gradients; run the global step (average,
        optimizer step, next epoch) once the swarm has accumulated ``target_batch_size``. Returns the closure's loss.
        """
        batch_size = check_step_arguments(self, closure=closure, batch_size=batch_size, grad_scaler=grad_scaler)
        # finished background work (delayed steps, averaging rounds) lands first: the closure sees those parameters
        self.state_averager.step()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        behind = not self.auxiliary and self._should_load_state_from_peers()
        if behind:
            logger.log(self.status_loglevel, f"Peer is behind the swarm (epoch {self.local_epoch} < "
                       f"{self.tracker.global_epoch}): downloading the state from peers")  # fmt: skip
            self.load_state_from_peers()
            return loss

        if not self.auxiliary:
            if grad_scaler is not None and grad_scaler.are_grads_finite(self) is False:
                logger.log(self.status_loglevel, "Gradients are not finite: dropping this epoch's local gradients")
                self._reset_local_accumulation()
                return loss
            self._accumulate(batch_size, grad_scaler)
            self._maybe_schedule_rounds()
        if self.tracker.ready_to_update_epoch and self._expected_peers() <= 1:
            # about to step alone: first make sure that nobody joined since the last fetch
            self.tracker.refresh_global_progress(timeout=min(self._averaging_limit, 10.0))
        if self.tracker.ready_to_update_epoch:
            self._update_global_epoch(grad_scaler)
        self._update_progress_bar()
        return loss

    def _accumulate(self, batch_size: int, grad_scaler: Optional[GradScaler]) -> None:
        if self.use_gradient_averaging:
            self.grad_averager.accumulate_grads_(batch_size)
            samples = self.grad_averager.local_samples_accumulated
        else:
            self._local_samples += batch_size
            samples = self._local_samples
            # (a state round may run in the background meanwhile: its delta-rule result keeps this local update)
            self.state_averager.step(optimizer_step=True, grad_scaler=grad_scaler, wait_for_delayed_updates=False)
            if grad_scaler is not None:
                grad_scaler.update()
        self.tracker.report_local_progress(self.local_epoch, samples)

    def _reset_local_accumulation(self) -> None:
        self._local_samples = 0
        if self.grad_averager is not None:
            self.grad_averager.reset_accumulated_grads_()
        self.tracker.report_local_progress(self.local_epoch, 0)

    def _should_load_state_from_peers(self) -> bool:
        fresh_progress = self.tracker.fetched_global_progress_this_epoch.is_set()
        if fresh_progress and self._should_check_synchronization_on_update:  # strict once per epoch, on fresh data
            self._should_check_synchronization_on_update = False
            return should_load_state(self.local_epoch, self.tracker.global_epoch, strict=True)
        return should_load_state(self.local_epoch, self.tracker.global_epoch, strict=False)

    def _maybe_schedule_rounds(self) -> None:
        """Start matchmaking ahead of the estimated end of the epoch, so that averaging begins without waiting."""
        self._maybe_schedule_gradient_averaging()
        self._maybe_schedule_state_averaging()

    def _update_global_epoch(self, grad_scaler: Optional[GradScaler]) -> None:
        # the last epoch's background optimizer step reads the gradient buffers that averaging is about to overwrite
        self.state_averager.wait_for_background_step()
        with self.tracker.pause_updates():  # (freezes the swarm's epoch, which may have moved since step() read it)
            if self.auxiliary or not should_load_state(self.local_epoch, self.tracker.global_epoch, strict=False):
                return self._advance_epoch(grad_scaler)
        self.load_state_from_peers()  # more than an epoch behind: load the swarm's state, never jump to its epoch

    def _advance_epoch(self, grad_scaler: Optional[GradScaler]) -> None:
        num_peers = self._expected_peers()
        new_epoch = next_epoch(self.local_epoch, self.tracker.global_epoch)
        optimizer_step, contributes = self.use_gradient_averaging and not self.auxiliary, True
        if self.use_gradient_averaging:
            if grad_scaler is not None and not self.auxiliary:  # each peer's own scale: average unscaled grads
                contributes = grad_scaler.unscale_accumulated_grads_(self, self.grad_averager.accumulated_grads())
            elif not self.auxiliary:  # (inf/NaN would spoil this peer's parameters for good; the others refuse them)
                contributes = self.grad_averager.accumulated_grads_are_finite()
            if not contributes:  # inf/NaN: this peer averages with weight 0 (and does not step alone)
                self.grad_averager.reset_accumulated_grads_()
            grad_round = self._start_gradient_averaging(num_peers)
            if self.delay_grad_averaging:
                self._background_grad_round = grad_round
                self.state_averager.submit_background(self._finish_gradient_averaging, grad_round)
            else:
                self._finish_gradient_averaging(grad_round)
                # a member one epoch ahead (it joined this round late in its epoch): land where it lands
                epochs, global_epoch = self._last_round_epochs, self.tracker.global_epoch
                new_epoch = epoch_after_gradient_round(self.local_epoch, global_epoch, epochs)
                num_peers = len(self._last_round_peers)  # the state round expects those who averaged just now
                grad_round = grad_round if num_peers > 1 else None  # (failed: the buffers hold our own grads)
            optimizer_step = optimizer_step and (contributes or grad_round is not None)
        # the last epoch's state average lands before the epoch moves on (after, it would be dropped as stale)
        self.state_averager.step(wait_for_delayed_updates=True)  # (queued before this gradient round: no wait on it)
        # that round only found its group with the others' round of the next epoch (it waited past its epoch for the
        # expected peers, whose own round was consumed so): skip one, so that the next rounds start together again
        skip_round, self.state_averager.round_met_later_epochs = self.state_averager.round_met_later_epochs, False
        average_state = num_peers > 1 and new_epoch % self.average_state_every == 0 and not skip_round
        state_control, self.scheduled_state = self.scheduled_state, None
        if state_control is not None and (
            not average_state or self.scheduled_state_epoch != new_epoch or state_control.done()
        ):  # (not needed, gathers another epoch than this peer is about to enter, or a group of others' used it)
            state_control.cancel()
            state_control = None
        if average_state:  # (re)start matchmaking now, knowing whom to expect
            state_control = state_control or self._try_schedule(self.state_averager, None, self.averaging_timeout,
                                                                 num_peers, gather=new_epoch)  # fmt: skip
            if state_control is not None:
                state_control.expected_group_size = num_peers
        self.state_averager.move_to_epoch(new_epoch, step_follows=optimizer_step)
        if optimizer_step and not self.offload_optimizer:  # the step reads param.grad: swap in the average
            with self.grad_averager.use_averaged_gradients():  # (already unscaled, before averaging)
                self.state_averager.step(optimizer_step=True)
            optimizer_step = False
        self.state_averager.step(
            optimizer_step=optimizer_step, delay_optimizer_step=self.delay_optimizer_step and optimizer_step,
            averaging_round=average_state, delay_averaging=self.delay_state_averaging, averaging_control=state_control,
            averaging_opts=None if state_control is not None else dict(timeout=self.averaging_timeout),
        )  # fmt: skip
        if self.grad_averager is not None:
            self.grad_averager.notify_used_averaged_gradients()
            if self.reuse_grad_buffers:
                self.grad_averager.reset_accumulated_grads_()
        if grad_scaler is not None:
            grad_scaler.update()
        self._local_samples = 0
        self.tracker.update_epoch(new_epoch=self.local_epoch)
        self._should_check_synchronization_on_update = True
        self._set_state_sharing_priority()
        logger.log(self.status_loglevel, f"{self.run_id}: epoch {self.local_epoch} begins")

    def _start_gradient_averaging(self, num_peers: int) -> Optional[StepControl]:
        """Load the mean accumulated gradient into the averaged buffers and, with peers around, start a round."""
        control, self.scheduled_grads = self.scheduled_grads, None
        if num_peers > 1 or self.auxiliary:
            try:
                if control is None:
                    control = self._watch_if_unlimited(
                        self.grad_averager.schedule_step(timeout=self.averaging_timeout, gather=self.local_epoch))
                control.expected_group_size = num_peers
                return self.grad_averager.step(control=control, wait=False, reset_accumulators=True)
            except Exception as e:
                if control is not None:
                    control.cancel()
                logger.warning(f"{self.run_id}: could not start averaging gradients ({e!r}); using local gradients")
                if self.grad_averager.local_times_accumulated == 0:
                    return None  # step() already loaded this peer's mean gradient into the averaged buffers
        elif control is not None:
            control.cancel()
        self.grad_averager.load_accumulators_into_averager_()
        self.grad_averager.reset_accumulated_grads_()
        return None

    def _finish_gradient_averaging(self, control: Optional[StepControl]) -> None:
        """Wait for a gradient round; if it fails, the buffers keep this peer's own mean gradient."""
        self._last_round_epochs = []
        if control is None:
            self._last_round_peers = set()  # nobody averaged with this peer: nobody to wait for next epoch
            return
        try:
            try:
                gathered = control.result(self.matchmaking_time)
            except concurrent.futures.TimeoutError:  # e.g. the expected peers left: say why step() waits this long
                if control.stage == AveragingStage.LOOKING_FOR_GROUP:
                    logger.info(
                        f"{self.run_id}: no group to average gradients with after {self.matchmaking_time} s "
                        f"({control.expected_group_size} peers expected); {self._wait_text}"
                    )
                gathered = control.result(self._wait_limit(self._averaging_limit - self.matchmaking_time))
            logger.log(self.status_loglevel, f"{self.run_id}: averaged gradients with {len(gathered)} peers")
            self._last_round_peers = {peer.to_bytes() for peer in gathered}
            self._last_round_epochs = list(gathered.values())
        except Exception as e:
            self._last_round_peers = set()
            waited_out = not control.done()  # (else the round failed and says why)
            control.cancel()
            reason = self._round_failure(control, waited_out, e)
            logger.warning(f"{self.run_id}: averaging gradients failed ({reason}); using local gradients")

    def _expected_peers(self) -> int:
        """Peers (this one included) expected in this epoch's averaging rounds: see ``count_expected_peers``."""
        if self.use_local_updates:  # epochs end at each peer's own pace: every live record may still come
            return self.tracker.global_progress.num_peers
        return self.tracker.count_expected_peers(self.local_epoch, self._last_round_peers)

    def _set_state_sharing_priority(self) -> None:
        for averager in (self.state_averager, self.grad_averager):
            if averager is not None and averager.allow_state_sharing:
                averager.state_sharing_priority = self.local_epoch

    def _update_progress_bar(self) -> None:
        now = time.monotonic()
        if now - self._last_progress_bar_update >= 0.2:
            self._last_progress_bar_update = now
            self._progress_bar.update(self.tracker.global_progress, self.local_epoch)

    def load_state_from_peers(self, **kwargs) -> None:
        """Download parameters, optimizer state and epoch from the best donor, retried for load_state_timeout s."""
        check_not_shut_down(self)
        check_load_state_arguments(kwargs)
        self._cancel_scheduled_rounds()
        self.state_averager.step(wait_for_delayed_updates=True, apply_delayed_updates=True)
        deadline = time.monotonic() + self.load_state_timeout
        # a state about to be replaced is nobody's best donor: while this peer downloads, others asking it (when the
        # up-to-date donors are slow to start) are refused, so they wait for those instead of taking a stale state
        sharing, self.state_averager.allow_state_sharing = self.state_averager.allow_state_sharing, False
        try:
            with self.tracker.pause_updates():
                loaded = load_state_with_retries(self.state_averager, deadline, self.run_id, **kwargs)
                outcome = f"downloaded the state of epoch {self.local_epoch}" if loaded else "no peer shared a state"
                logger.log(self.status_loglevel, f"{self.run_id}: {outcome}")
                global_epoch = self.tracker.global_epoch
                if global_epoch - 1 <= self.local_epoch < global_epoch:
                    self.state_averager.local_epoch = global_epoch
                    self.state_averager._update_scheduler()
                self._restart_epoch()
        finally:
            self.state_averager.allow_state_sharing = sharing
        self._set_state_sharing_priority()

    def _restart_epoch(self) -> None:
        """Start ``local_epoch`` afresh after loading a state (in tracker.pause_updates): every peer near counts."""
        self._local_samples, self._last_round_peers = 0, None
        if self.grad_averager is not None:
            self.grad_averager.reset_accumulated_grads_()
        self.tracker.update_epoch(new_epoch=self.local_epoch)
        self._should_check_synchronization_on_update = True
        self._set_state_sharing_priority()

    def _cancel_scheduled_rounds(self) -> None:
        for control in (self.scheduled_grads, self.scheduled_state):
            if control is not None:
                control.cancel()
        self.scheduled_grads = self.scheduled_state = None

    def shutdown(self) -> None:
        """Publish that this peer left, finish or cancel background rounds, and stop the averagers."""
        logger.log(self.status_loglevel, f"{self.run_id}: shutting down")
        self._shut_down = True
        self._cancel_scheduled_rounds()
        self._progress_bar.close()
        self.tracker.shutdown(self.shutdown_timeout)
        self.state_averager.cancel_background_averaging(self.shutdown_timeout, self._background_grad_round)
        self.state_averager.step(wait_for_delayed_updates=True, apply_delayed_updates=True)
        self.state_averager.shutdown()
        if self.grad_averager is not None:
            self.grad_averager.shutdown()

    def __enter__(self) -> Optimizer:  # ``with Optimizer(...) as opt:`` shuts it down on leaving, also after an error
        return self

    def __exit__(self, *exc_info) -> None:
        self.shutdown()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(run_id={self.run_id!r}, epoch={self.local_epoch}, opt={type(self.opt).__name__})"
        )
