"""How hivemind.Optimizer behaves like a torch optimizer: param groups, state_dict round trips, frozen parameters."""

from __future__ import annotations

import contextlib
from collections.abc import MutableMapping
from typing import Any, Dict, Iterable, Iterator, List, Sequence

import torch

from hivemind.optim.scheduler_sync import scheduler_learning_rates_kept

__all__ = [
    "as_param_groups",
    "ParamGroupView",
    "model_param_groups",
    "training_state_dict",
    "load_training_state_dict_",
    "frozen_gradients_hidden",
]


def as_param_groups(params: Iterable[Any]) -> List[Dict[str, Any]]:
    """Parameters or param groups (as a torch optimizer accepts them) as a list of new param-group dicts."""
    params = list(params)
    if params and isinstance(params[0], dict):
        return [dict(group, params=list(group["params"])) for group in params]
    return [{"params": params}]


class ParamGroupView(MutableMapping):
    """
    One param group of the wrapped optimizer as the model sees it: ``group["params"]`` are the model's parameters
    (the wrapped optimizer may hold CPU copies of them), and every other entry (``lr``, ``weight_decay``, ...) is the
    wrapped optimizer's own, read and written through, so that code written for a torch optimizer (a manual
    learning-rate warm-up, a scheduler) changes the training.
    """

    def __init__(self, group: Dict[str, Any], model_params: Sequence[torch.Tensor]):
        self._group, self._model_params = group, list(model_params)

    def __getitem__(self, key: str) -> Any:
        return self._model_params if key == "params" else self._group[key]

    def __setitem__(self, key: str, value: Any) -> None:
        if key == "params":
            raise ValueError("the parameters of a param group cannot be replaced: peers must train the same ones")
        self._group[key] = value

    def __delitem__(self, key: str) -> None:
        if key == "params":
            raise ValueError("the parameters of a param group cannot be removed: peers must train the same ones")
        del self._group[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._group)

    def __len__(self) -> int:
        return len(self._group)

    def __repr__(self) -> str:
        return repr(dict(self))


def model_param_groups(optimizer: torch.optim.Optimizer, model_params: Sequence[torch.Tensor]) -> List[ParamGroupView]:
    """Views of ``optimizer``'s param groups with ``model_params`` (in the optimizer's order) as their parameters."""
    remaining, views = iter(model_params), []
    for group in optimizer.param_groups:
        views.append(ParamGroupView(group, [next(remaining) for _ in group["params"]]))
    return views


def training_state_dict(optimizer: torch.optim.Optimizer, local_epoch: int) -> Dict[str, Any]:
    """``optimizer.state_dict()`` with the epoch added as ``state["local_epoch"]``."""
    state_dict = optimizer.state_dict()
    state_dict["state"] = dict(state_dict["state"], local_epoch=local_epoch)
    return state_dict


@torch.no_grad()
def load_training_state_dict_(state_averager: Any, state_dict: Dict[str, Any]) -> None:
    """
    Load a :func:`training_state_dict` into a TrainingStateAverager (the caller's dict is not changed). A state dict
    holds no parameters: as with torch, the model's parameters are the ones to go on from, so the optimizer's copies
    of them (with ``offload_optimizer``) are set from the model, which the caller loads first. Background work of
    the training being replaced (a delayed step, a state average) is waited for and dropped.
    """
    state = dict(state_dict["state"])
    epoch = state.pop("local_epoch", state_averager.local_epoch)
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        raise ValueError(f"state['local_epoch'] must be a non-negative int, got {epoch!r}")
    _check_state_shapes(state_averager.optimizer.state_dict(), dict(state_dict, state=state))
    state_averager.step(wait_for_delayed_updates=True, apply_delayed_updates=False)
    state_averager._pending_step = state_averager._pending_averaging = None  # finished: their results are dropped
    optimizer, scheduler = state_averager.optimizer, state_averager.scheduler
    start = getattr(state_averager, "scheduler_start", None)  # (a subclass may drive schedulers of its own)
    with state_averager._state_lock:
        if start is not None:  # an earlier epoch than the scheduler counted (a rollback): it starts over
            start.rewind_for(optimizer, scheduler, epoch)
    with state_averager._state_lock, scheduler_learning_rates_kept(optimizer, scheduler, epoch):
        optimizer.load_state_dict(dict(state_dict, state=state))
        for main, param in zip(state_averager.main_parameters, state_averager.optimizer_parameters):
            if param is not main:
                param.copy_(main)
        state_averager.local_epoch = epoch
    state_averager._update_scheduler()


def _check_state_shapes(local: Dict[str, Any], loaded: Dict[str, Any]) -> None:
    """ValueError if a tensor of ``loaded`` (an optimizer's state_dict) has another shape than the same entry of the
    local state (e.g. a checkpoint of another model: torch would load it, and every optimizer step would fail)."""
    local_ids = [index for group in local["param_groups"] for index in group["params"]]
    loaded_groups = loaded.get("param_groups")
    if not isinstance(loaded_groups, (list, tuple)) or not all(isinstance(g, dict) for g in loaded_groups):
        return  # (torch's load_state_dict says what is wrong)
    loaded_ids = [index for group in loaded_groups for index in group.get("params", ())]
    loaded_state = loaded.get("state")
    if not isinstance(loaded_state, dict):
        return
    for position, (local_id, loaded_id) in enumerate(zip(local_ids, loaded_ids)):
        local_entry, loaded_entry = local["state"].get(local_id), loaded_state.get(loaded_id)
        if not isinstance(local_entry, dict) or not isinstance(loaded_entry, dict):
            continue
        for key, value in loaded_entry.items():
            mine = local_entry.get(key)
            if isinstance(value, torch.Tensor) and isinstance(mine, torch.Tensor) and value.shape != mine.shape:
                raise ValueError(
                    f"the state dict's {key!r} of parameter {position} has shape {tuple(value.shape)}, the local one "
                    f"{tuple(mine.shape)}: it belongs to another model (load this model's optimizer state)"
                )


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
