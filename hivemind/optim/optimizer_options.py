"""hivemind.Optimizer's options: defaults that depend on each other, and refusal of combinations that cannot work."""

from __future__ import annotations

import ctypes
import math
import multiprocessing as mp
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional

import torch

from hivemind.dht.dht import check_dht_argument
from hivemind.optim.grad_scaler import GradScaler
from hivemind.optim.scheduler_sync import is_scheduler_instance
from hivemind.p2p.call_arguments import MAX_HANDLE_NAME_BYTES
from hivemind.p2p.servicer import get_handle_name
from hivemind.utils.logging import get_logger
from hivemind.utils.value_checks import is_count, is_integer, is_number

__all__ = [
    "OptimizerOptions",
    "resolve_options",
    "positive_int_batch_size",
    "check_not_shut_down",
    "check_state_averager_arguments",
]

logger = get_logger(__name__)


@dataclass(frozen=True)
class OptimizerOptions:
    """The effective values of the options that have derived defaults."""

    offload_optimizer: bool
    delay_optimizer_step: bool
    delay_grad_averaging: bool
    allreduce_timeout: float
    next_chunk_timeout: float


def check_dht(dht: Any) -> None:
    check_dht_argument(dht)


def _is_optimizer_factory(optimizer: Any) -> bool:
    return not isinstance(optimizer, torch.optim.Optimizer) and callable(optimizer)


def resolve_options(
    *,
    run_id: Any,
    target_batch_size: Any,
    batch_size_per_step: Optional[int],
    optimizer: Any,
    params: Any,
    scheduler: Any,
    matchmaking_time: float,
    averaging_timeout: float,
    allreduce_timeout: Optional[float],
    next_chunk_timeout: Optional[float],
    reuse_grad_buffers: bool,
    offload_optimizer: Optional[bool],
    delay_optimizer_step: Optional[bool],
    delay_grad_averaging: bool,
    average_state_every: int,
    use_local_updates: bool,
    client_mode: bool,
    auxiliary: bool,
    grad_averager_factory: Any,
    load_state_timeout: Any = 600.0,
    averager_opts: Any = None,
) -> OptimizerOptions:
    """Fill in derived defaults and raise ValueError (saying what to change) for options that do not fit together."""
    if not isinstance(run_id, str) or not run_id or "." in run_id:
        raise ValueError(f"run_id must be a non-empty string without dots (it prefixes DHT keys), got {run_id!r}")
    _check_run_id_length(run_id)
    if isinstance(target_batch_size, bool) or not isinstance(target_batch_size, int) or target_batch_size <= 0:
        raise ValueError(f"target_batch_size must be a positive int (samples per epoch), got {target_batch_size!r}")
    if batch_size_per_step is not None and not is_count(batch_size_per_step):  # (as step's batch_size)
        raise ValueError(f"batch_size_per_step must be None or a positive int, got {batch_size_per_step!r}")
    is_factory = _is_optimizer_factory(optimizer)
    if not is_factory and not isinstance(optimizer, torch.optim.Optimizer):
        raise ValueError(
            f"optimizer must be a torch optimizer or a factory of one (lambda params: ...), got {optimizer!r}"
        )
    if is_factory and params is None:
        raise ValueError("optimizer is a factory: pass the model's parameters as params=model.parameters()")
    if not is_factory and params is not None:
        raise ValueError("params= goes with an optimizer factory; a built optimizer already holds its parameters")
    if is_factory and scheduler is not None and hasattr(scheduler, "step") and hasattr(scheduler, "optimizer"):
        raise ValueError("with an optimizer factory, pass the scheduler as a factory too: scheduler=lambda opt: ...")
    check_averager_opts(averager_opts)
    if isinstance(average_state_every, bool) or not isinstance(average_state_every, int) or average_state_every < 1:
        raise ValueError(f"average_state_every must be a positive int (epochs), got {average_state_every!r}")
    for name, value in [
        ("matchmaking_time", matchmaking_time),
        ("averaging_timeout", math.inf if averaging_timeout is None else averaging_timeout),  # None: no limit
        ("load_state_timeout", load_state_timeout),
    ]:
        if not is_number(value):
            raise TypeError(f"{name} must be a positive number of seconds, got {type(value).__name__}: {value!r}")
        if not value > 0:  # (NaN too)
            raise ValueError(f"{name} must be a positive number of seconds, got {value}")
    if averaging_timeout is not None and averaging_timeout <= matchmaking_time:
        raise ValueError(
            f"averaging_timeout ({averaging_timeout} s) must exceed matchmaking_time "
            f"({matchmaking_time} s): a round first spends matchmaking_time gathering peers"
        )
    if auxiliary and client_mode:
        raise ValueError(
            "an auxiliary peer only helps others average, which needs incoming connections: it cannot "
            "run on a DHT in client mode"
        )
    if auxiliary and batch_size_per_step is not None:
        raise ValueError("an auxiliary peer processes no samples: leave batch_size_per_step=None")
    if use_local_updates:
        conflicts = [
            name
            for name, value in [
                ("reuse_grad_buffers", reuse_grad_buffers),
                ("delay_grad_averaging", delay_grad_averaging),
                ("grad_averager_factory", grad_averager_factory is not None),
                *((f"averager_opts' {name}", name in GRADIENT_AVERAGER_ONLY) for name in averager_opts or ()),
            ]
            if value
        ]
        if conflicts:
            raise ValueError(f"use_local_updates averages no gradients, so it cannot be combined with {conflicts}")

    if offload_optimizer is None:
        offload_optimizer = is_factory and not use_local_updates
    if offload_optimizer and not is_factory:
        raise ValueError("offload_optimizer builds the optimizer on CPU copies of the parameters: pass a factory")
    if delay_optimizer_step is None:
        delay_optimizer_step = delay_grad_averaging
    if delay_grad_averaging and not delay_optimizer_step:
        raise ValueError("delay_grad_averaging=True requires delay_optimizer_step=True")
    if delay_optimizer_step and not offload_optimizer:
        raise ValueError(
            "delay_optimizer_step needs offload_optimizer=True and an optimizer factory (the step runs "
            "in the background on CPU copies of the parameters)"
        )
    if delay_optimizer_step and use_local_updates:
        logger.warning(
            "delay_optimizer_step has no effect with use_local_updates=True: each local step runs the optimizer at "
            "once (a background step would read gradients the next step is already writing)"
        )
    return OptimizerOptions(
        offload_optimizer=bool(offload_optimizer),
        delay_optimizer_step=bool(delay_optimizer_step),
        delay_grad_averaging=bool(delay_grad_averaging),
        allreduce_timeout=averaging_timeout if allreduce_timeout is None else allreduce_timeout,
        next_chunk_timeout=matchmaking_time if next_chunk_timeout is None else next_chunk_timeout,
    )


def positive_int_batch_size(batch_size: Any) -> int:
    """The batch size of one step as an int (numpy/torch integers too); ValueError for anything else."""
    if is_count(batch_size):
        return int(batch_size)
    raise ValueError(f"batch_size must be a positive int (samples behind this step), got {batch_size!r}")


def check_not_shut_down(optimizer: Any) -> None:
    """RuntimeError saying so if ``optimizer`` was shut down (its averagers are gone: nothing would work)."""
    if optimizer._shut_down:
        raise RuntimeError(
            f"{type(optimizer).__name__} was shut down: it no longer trains with peers; create a new one (and a "
            f"new DHT if that was shut down too) to go on training"
        )


def check_step_arguments(optimizer: Any, *, closure: Any, batch_size: Any, grad_scaler: Any):
    """Refuse a misused ``Optimizer.step()`` with an error that says what to do; returns the step's batch size
    (None for an auxiliary peer)."""
    check_not_shut_down(optimizer)
    if closure is not None and not callable(closure):
        raise TypeError(f"closure must be None or a callable that returns the loss, got {type(closure).__name__}")
    if not (grad_scaler is None or isinstance(grad_scaler, GradScaler)):
        raise ValueError(
            f"grad_scaler must be a hivemind.GradScaler (the torch one would step the optimizer at "
            f"every call), got {type(grad_scaler).__name__}"
        )
    if optimizer.auxiliary:
        if closure is not None or batch_size is not None:
            raise ValueError("an auxiliary peer does not train: call step() without closure and batch_size")
        return None
    if batch_size is None and optimizer.batch_size_per_step is None:
        raise ValueError(
            "pass step(batch_size=...) or set batch_size_per_step in the constructor, so that the swarm can "
            "count samples"
        )
    return positive_int_batch_size(optimizer.batch_size_per_step if batch_size is None else batch_size)


def check_state_averager_arguments(
    optimizer: Any,
    params: Any,
    scheduler: Any,
    offload_optimizer: bool,
    custom_gradients: bool,
    average_opt_statistics: Any = (),
    extra_tensors: Any = (),
) -> bool:
    """Refuse TrainingStateAverager arguments that do not fit together (ValueError) or are of a wrong type
    (TypeError); returns whether ``optimizer`` is a factory."""
    if isinstance(average_opt_statistics, str):  # its letters would be taken for names: "no statistic 'e'"
        raise TypeError(
            f"average_opt_statistics must be a sequence of names of optimizer statistics, got the str "
            f"{average_opt_statistics!r}: pass ({average_opt_statistics!r},)"
        )
    for index, tensor in enumerate(extra_tensors):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"extra_tensors[{index}] must be a torch.Tensor, got {type(tensor).__name__}")
    optimizer_is_factory = not isinstance(optimizer, torch.optim.Optimizer)
    if optimizer_is_factory and not callable(optimizer):
        raise ValueError(f"optimizer must be a torch optimizer or a factory of one, got {type(optimizer).__name__}")
    if optimizer_is_factory and params is None:
        raise ValueError("with an optimizer factory, pass the model's parameters as params=...")
    if not optimizer_is_factory and params is not None:
        raise ValueError("params= is only for an optimizer factory; a built optimizer already has its parameters")
    if offload_optimizer and not optimizer_is_factory:
        raise ValueError("offload_optimizer needs an optimizer factory (the optimizer is built on CPU copies)")
    if optimizer_is_factory and scheduler is not None and is_scheduler_instance(scheduler):
        raise ValueError("with an optimizer factory, the scheduler must be a factory too: lambda opt: ...")
    if custom_gradients and not offload_optimizer:
        logger.warning("custom_gradients has no effect without offload_optimizer")
    return optimizer_is_factory


# averager options that hivemind.Optimizer passes itself, or sets on an averager once it is built, whoever built it
# (averaged_grads, warn, max_epoch_spread), and the Optimizer option (or what) that sets each one
_OPTIMIZER_SETS = {
    "dht": "its dht", "prefix": "run_id (the averagers use <run_id>_state_averager / _grad_averager)",
    "start": "the Optimizer itself", "min_matchmaking_time": "matchmaking_time=",
    "allreduce_timeout": "allreduce_timeout=", "next_chunk_timeout": "next_chunk_timeout=",
    "shutdown_timeout": "shutdown_timeout=", "client_mode": "the DHT's client_mode", "auxiliary": "auxiliary=",
    "compression": "grad_compression= and state_averaging_compression=",
    "state_compression": "load_state_compression=",
    "offload_optimizer": "offload_optimizer=", "custom_gradients": "the Optimizer itself",
    "status_loglevel": "verbose=", "optimizer": "optimizer=", "params": "params=", "scheduler": "scheduler=",
    "delta_rule_averaging": "use_local_updates and delay_state_averaging", "extra_tensors": "extra_tensors=",
    "average_opt_statistics": "average_opt_statistics=", "reuse_grad_buffers": "reuse_grad_buffers=",
    "averaged_grads": "the Optimizer itself", "warn": "the Optimizer itself",
    "max_epoch_spread": "use_local_updates= (1 with local updates, else 0)",
    "performance_ema_alpha": "performance_ema_alpha=", "parameters": "the state averager's main_parameters",
}  # fmt: skip


# averager_opts configure both averagers, except the options that only one of them takes, which go to it alone
STATE_AVERAGER_ONLY = frozenset(
    {"sync_epoch_when_averaging", "reuse_tensors", "parameter_names", "initialize_optimizer"}
)
GRADIENT_AVERAGER_ONLY = frozenset({"accumulate_grads_on", "averager_rank", "min_compression_ratio"})  # (PowerSGD's)


def averager_opts_for(averager_opts: Mapping[str, Any], averager: str) -> Dict[str, Any]:
    """The user's ``averager_opts`` that the ``"state"`` or ``"gradient"`` averager gets: all of them but those that
    only the other averager takes."""
    other_only = GRADIENT_AVERAGER_ONLY if averager == "state" else STATE_AVERAGER_ONLY
    return {name: value for name, value in averager_opts.items() if name not in other_only}


def checked_epoch_spread(max_epoch_spread: Any) -> int:
    """``TrainingStateAverager(max_epoch_spread=...)``: a whole number of epochs, 0 or more (ValueError otherwise)."""
    if not (is_integer(max_epoch_spread) and max_epoch_spread >= 0):
        raise ValueError(
            f"max_epoch_spread must be a whole number of epochs, 0 or more (0: only members of the latest epoch "
            f"average as equals), got {max_epoch_spread!r}"
        )
    return int(max_epoch_spread)


class SharedEpochSpread:
    """``TrainingStateAverager.max_epoch_spread``, kept in shared memory (the averager's ``_max_epoch_spread``, made
    by :meth:`make` before its process starts) so that the process follows a value set after it started: e.g.
    hivemind.Optimizer raises it to 1 with use_local_updates, also in a state averager that a subclass built."""

    @staticmethod
    def make(max_epoch_spread: Any, start_method: Optional[str]) -> Any:
        return mp.get_context(start_method).Value(ctypes.c_int64, checked_epoch_spread(max_epoch_spread), lock=False)

    def __get__(self, averager: Any, owner: Optional[type] = None) -> Any:
        return self if averager is None else int(averager._max_epoch_spread.value)

    def __set__(self, averager: Any, max_epoch_spread: Any) -> None:
        averager._max_epoch_spread.value = checked_epoch_spread(max_epoch_spread)


def check_averager_opts(averager_opts: Any) -> None:
    """TypeError for a non-dict ``averager_opts``, or for an option the Optimizer sets itself (it would be passed
    twice: "got multiple values for keyword argument", possibly after the first averager had started, or be
    overwritten once the averager is built)."""
    if averager_opts is None:
        return
    if not isinstance(averager_opts, Mapping):
        raise TypeError(f"averager_opts must be a dict of DecentralizedAverager options, got {averager_opts!r}")
    for name in averager_opts:
        if name in _OPTIMIZER_SETS:
            raise TypeError(f"averager_opts cannot set {name}: the Optimizer sets it from {_OPTIMIZER_SETS[name]}")


def _check_run_id_length(run_id: str) -> None:
    """The averagers' handler names start with the run_id and must fit libp2p's protocol id limit."""
    from hivemind.optim.grad_averager import GradientAverager  # (imported here: state_averager imports this module)
    from hivemind.optim.state_averager import TrainingStateAverager

    for averager_type, suffix in ((TrainingStateAverager, "_state_averager"), (GradientAverager, "_grad_averager")):
        for handler in averager_type._get_rpc_handlers():
            name_bytes = len(get_handle_name(run_id + suffix, averager_type.__name__, handler.name).encode())
            if name_bytes > MAX_HANDLE_NAME_BYTES:
                limit = MAX_HANDLE_NAME_BYTES - (name_bytes - len(run_id.encode()))
                raise ValueError(
                    f"run_id is {len(run_id.encode())} bytes long, too long for the handler names of its averagers "
                    f"(libp2p allows {MAX_HANDLE_NAME_BYTES} bytes): use a run_id of at most {limit} bytes"
                )
