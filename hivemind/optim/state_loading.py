"""Downloading the training state from peers: a donor's state checked and applied at once, and hivemind.Optimizer's
attempts retried after errors within a deadline."""

from __future__ import annotations

import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from hivemind.dht.process_channel import ChannelClosedError
from hivemind.optim.epoch_rule import MAX_EPOCH
from hivemind.optim.optimizer_state import (
    OptimizerStateError,
    dump_optimizer_state,
    initialize_optimizer_state_,
    introduces_non_finite,
    load_optimizer_state,
)
from hivemind.optim.scheduler_sync import scheduler_learning_rates_kept
from hivemind.optim.state_lock import LockOptimizerHeldError
from hivemind.utils.logging import get_logger

__all__ = [
    "LOAD_STATE_RETRY_DELAY",
    "apply_downloaded_state_",
    "check_load_state_arguments",
    "load_first_accepted_state",
    "load_state_without_statistics",
    "load_state_with_retries",
]

logger = get_logger(__name__)

LOAD_STATE_RETRY_DELAY = 1.0  # seconds between attempts of Optimizer.load_state_from_peers after an error


def check_load_state_arguments(kwargs: Dict[str, Any]) -> None:
    """
    Refuse (TypeError) keyword arguments of a training state download that cannot work: it applies the state it
    downloads, so it takes only ``timeout`` and ``wait=True`` (no future to wait on later).
    """
    unknown = sorted(set(kwargs) - {"timeout", "wait"})
    if unknown:
        raise TypeError(f"load_state_from_peers() takes only timeout= (and wait=True), got {', '.join(unknown)}")
    if kwargs.get("wait", True) is not True:
        raise TypeError(
            f"load_state_from_peers() applies the state it downloads and returns when done: wait must be True, got "
            f"{kwargs['wait']!r} (call it from a thread to go on meanwhile)"
        )


def load_first_accepted_state(
    averager: Any, apply: Callable[[Any, List[torch.Tensor]], None], optional_tail: int = 0, **kwargs
) -> Optional[Tuple[Any, List[torch.Tensor]]]:
    """
    Download the best donor's state and ``apply(metadata, tensors)`` it; a state that ``apply`` refuses (raising
    OptimizerStateError, ValueError, TypeError or KeyError, having changed nothing) is logged and the next best donor
    is asked, within ``timeout``. Returns (metadata, tensors) of the state applied, or None if no donor's was.
    A state may lack the last ``optional_tail`` tensors of the averager's own (all of them or none).
    """
    check_load_state_arguments(kwargs)
    timeout = kwargs.get("timeout")
    deadline = None if timeout is None else time.monotonic() + timeout
    refused: List[Any] = []  # donors whose state was refused: a hostile or broken donor of the highest priority
    while True:  # must not keep newcomers from the others' state
        remaining = None if deadline is None else max(deadline - time.monotonic(), 0.0)
        extra = {"optional_tail": optional_tail} if optional_tail else {}
        loaded = averager._load_state_from_peers_excluding(refused, timeout=remaining, **extra)
        if loaded is None:
            return None
        metadata, tensors, donor = loaded
        try:
            apply(metadata, list(tensors))
        except (OptimizerStateError, ValueError, TypeError, KeyError) as e:
            logger.warning(f"Refused the state downloaded from {donor}, asking the next donor: {e}")
            refused.append(donor)
            continue
        return metadata, tensors


def load_state_without_statistics(
    averager: Any,
    optimizer: torch.optim.Optimizer,
    lock: Any,
    apply: Callable[[Any, List[torch.Tensor]], None],
    num_local: int,
    **kwargs,
) -> Optional[Tuple[Any, List[torch.Tensor]]]:
    """
    :func:`load_first_accepted_state` for an averager whose optimizer has no statistics yet (made with
    initialize_optimizer=False). A donor that has trained shares statistics, one made likewise that has not stepped
    yet shares none, and a download is checked against the local state: so the statistics are created first (as a
    fresh optimizer's, the template of a donor's) and each donor's state is accepted with or without them, in one
    download. A state without statistics is applied to the optimizer without its new ones; if no state was loaded,
    the optimizer is given back its empty state.

    :param num_local: how many tensors (parameters and extra tensors) come before the optimizer's in the state
    """
    check_load_state_arguments(kwargs)
    with lock:
        num_before = len(dump_optimizer_state(optimizer)[1])  # (e.g. a learning rate that is a tensor)
        initialize_optimizer_state_(optimizer)
        num_statistics = len(dump_optimizer_state(optimizer)[1]) - num_before  # the last tensors of the state
    if not optimizer.state:  # an optimizer without statistics (e.g. SGD without momentum): nothing is optional
        return load_first_accepted_state(averager, apply, **kwargs)

    def apply_with_or_without_statistics(metadata: Any, tensors: List[torch.Tensor]) -> None:
        statistics = dict(optimizer.state)
        if len(tensors) == num_local + num_before:  # the donor has no statistics: neither has the optimizer then
            with lock:
                optimizer.state.clear()
        try:
            apply(metadata, tensors)
        except BaseException:
            with lock:  # back to the template, for the next donor's state
                optimizer.state.clear()
                optimizer.state.update(statistics)
            raise

    loaded = None
    try:
        loaded = load_first_accepted_state(
            averager, apply_with_or_without_statistics, optional_tail=num_statistics, **kwargs
        )
    finally:
        if loaded is None:  # (also on an error): no statistics, as before (its hyperparameters are left as they are)
            with lock:
                optimizer.state.clear()
    return loaded


def load_state_with_retries(state_averager: Any, deadline: float, run_id: str, **kwargs) -> Optional[Any]:
    """
    ``state_averager.load_state_from_peers(**kwargs)`` until it returns (None: nobody shared a usable state), retried
    after an error until ``deadline`` (``time.monotonic()`` seconds); each attempt gets the time left, at most
    ``kwargs["timeout"]`` if given. An error on the last attempt is logged and gives None; ChannelClosedError (the
    averager's process is gone) and LockOptimizerHeldError (the caller holds lock_optimizer) are raised at once.
    """
    user_timeout = kwargs.pop("timeout", None)
    while True:
        remaining = deadline - time.monotonic()
        timeout = remaining if user_timeout is None else min(user_timeout, remaining)
        try:
            return state_averager.load_state_from_peers(timeout=max(timeout, 0.0), **kwargs)
        except (ChannelClosedError, LockOptimizerHeldError):  # (no attempt can succeed, and it says why)
            raise
        except Exception as e:
            if time.monotonic() + LOAD_STATE_RETRY_DELAY >= deadline:
                logger.warning(f"{run_id}: could not load the state from peers: {e!r}")
                return None
            logger.warning(f"{run_id}: loading the state from peers failed ({e!r}), retrying")
            time.sleep(LOAD_STATE_RETRY_DELAY)  # an error that comes at once must not spin for minutes


@torch.no_grad()
def apply_downloaded_state_(averager: Any, metadata: Any, tensors: List[torch.Tensor]) -> None:
    """
    Check a donor's state against a TrainingStateAverager's (ValueError or OptimizerStateError if it does not fit or
    its epoch is behind the local one; then nothing changes) and apply it at once: optimizer state, parameters, extra
    tensors, epoch; the scheduler is brought to that epoch.
    """
    if not isinstance(metadata, dict) or not isinstance(metadata.get("optimizer_metadata"), (list, tuple)):
        raise ValueError(f"the donor's metadata is not a training state: {metadata!r:.100}")
    epoch = metadata.get("epoch")
    if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
        raise ValueError(f"the donor's epoch is not a non-negative int: {epoch!r:.50}")
    if epoch < averager.local_epoch:
        raise ValueError(f"the donor is at epoch {epoch}, behind the local epoch {averager.local_epoch}")
    if epoch > MAX_EPOCH:
        raise ValueError(f"the donor claims an absurd epoch {epoch} (more than {MAX_EPOCH})")
    local = [*averager.optimizer_parameters, *averager.extra_tensors]
    if len(tensors) < len(local):
        raise ValueError(f"the donor sent {len(tensors)} tensors, at least {len(local)} are needed")
    for index, (mine, theirs) in enumerate(zip(local, tensors)):
        if not isinstance(theirs, torch.Tensor) or theirs.shape != mine.shape:
            raise ValueError(
                f"tensor {index} of the donor has shape {getattr(theirs, 'shape', None)}, "
                f"the local one {tuple(mine.shape)}"
            )
        if introduces_non_finite(theirs, mine):
            raise ValueError(f"tensor {index} of the donor holds inf/NaN, the local one does not")
    optimizer, scheduler = averager.optimizer, averager.scheduler
    with averager._state_lock, scheduler_learning_rates_kept(optimizer, scheduler, epoch):
        load_optimizer_state(optimizer, metadata["optimizer_metadata"], tensors[len(local) :])
        for mine, theirs in zip(local, tensors):
            mine.copy_(theirs)
        averager.local_epoch = epoch
        averager._copy_optimizer_parameters_to_model()
    averager._update_scheduler()
