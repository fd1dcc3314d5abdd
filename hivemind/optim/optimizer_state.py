"""Flatten a torch optimizer's state into (metadata, tensors) for sharing with peers, and load it back safely."""

from __future__ import annotations

import math
from typing import Any, Dict, List, Sequence, Tuple

import torch

from hivemind.compression import CompressionInfo, TensorRole
from hivemind.utils.nested import nested_flatten, nested_pack

__all__ = [
    "initialize_optimizer_state_",
    "dump_optimizer_state",
    "load_optimizer_state",
    "OptimizerStateError",
    "introduces_non_finite",
    "shared_state_infos",
]

_SCALAR_TYPES = (type(None), bool, int, float, str)


class OptimizerStateError(ValueError):
    """A peer's optimizer state does not fit the local optimizer (other optimizer type, options or shapes)."""


@torch.no_grad()
def initialize_optimizer_state_(opt: torch.optim.Optimizer) -> None:
    """
    Create the optimizer's per-parameter statistics (e.g. Adam's moments) without changing parameters: one step with
    zero gradients, after which parameters and gradients are restored (a weight decay that step applied is undone).
    Peers need the state to exist to exchange it. The state is that of 1.1.12's zero-gradient step, so that peers of
    both libraries turn the same averaged gradients into the same updates: step counters keep the step taken (Adam's
    ``step`` is 1: bias correction) and statistics derived from the learning rate have it (Rprop's step sizes,
    ASGD's eta; a zero learning rate would leave Rprop's at their minimum and ASGD's first step at zero).
    """
    saved = []
    for group in opt.param_groups:
        for param in group["params"]:
            saved.append((param, param.detach().clone(), param.grad))
            param.grad = torch.zeros_like(param)
    try:
        opt.step()
    finally:
        for param, value, grad in saved:
            param.copy_(value)
            param.grad = grad


def dump_optimizer_state(opt: torch.optim.Optimizer) -> Tuple[List[Dict[str, Any]], List[torch.Tensor]]:
    """
    The optimizer's ``state_dict()`` as a flat list of metadata entries (one per leaf, dict keys in sorted order):
    ``{"type": "tensor", "index": i}`` for the i-th tensor in the returned list, ``{"type": "value", "value": v}``
    for anything else (learning rates, betas, flags).
    """
    metadata, tensors = [], []
    for leaf in nested_flatten(opt.state_dict()):
        if isinstance(leaf, torch.Tensor):
            metadata.append({"type": "tensor", "index": len(tensors)})
            tensors.append(leaf)
        else:
            metadata.append({"type": "value", "value": leaf})
    return metadata, tensors


def load_optimizer_state(
    opt: torch.optim.Optimizer, flat_metadata: Sequence[Dict[str, Any]], flat_tensors: Sequence[torch.Tensor]
) -> None:
    """
    Load a state made by :func:`dump_optimizer_state` on another peer into ``opt`` (whose state must have been
    initialized, e.g. by :func:`initialize_optimizer_state_`). The state is checked against the local one first:
    same number of leaves, tensors of the same shapes (with no inf/NaN unless the local ones have some), plain values
    of the same kind where the local state has values (see ``_same_kind``). The local parameter ids are kept.
    Raises :class:`OptimizerStateError` and leaves ``opt`` unchanged if anything differs.
    """
    local_state = opt.state_dict()
    local_leaves = list(nested_flatten(local_state))
    if not isinstance(flat_metadata, (list, tuple)) or len(flat_metadata) != len(local_leaves):
        count = len(flat_metadata) if isinstance(flat_metadata, (list, tuple)) else type(flat_metadata).__name__
        raise OptimizerStateError(
            f"optimizer state has {count} entries, the local optimizer has {len(local_leaves)}: "
            f"peers must use the same optimizer type and parameters"
        )
    new_leaves = []
    for position, (entry, local_leaf) in enumerate(zip(flat_metadata, local_leaves)):
        new_leaves.append(_decode_leaf(position, entry, local_leaf, flat_tensors))
    new_state = nested_pack(new_leaves, local_state)
    for new_group, local_group in zip(new_state["param_groups"], local_state["param_groups"]):
        new_group["params"] = local_group["params"]  # parameter ids are local; never take them from a peer
    opt.load_state_dict(new_state)


def _decode_leaf(position: int, entry: Any, local_leaf: Any, flat_tensors: Sequence[torch.Tensor]) -> Any:
    if not isinstance(entry, dict) or entry.get("type") not in ("tensor", "value"):
        raise OptimizerStateError(f"optimizer state entry {position} is malformed: {entry!r:.100}")
    if entry["type"] == "tensor":
        index = entry.get("index")
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(flat_tensors):
            raise OptimizerStateError(f"optimizer state entry {position} refers to a missing tensor {index!r:.50}")
        if not isinstance(local_leaf, torch.Tensor):
            raise OptimizerStateError(f"optimizer state entry {position} is a tensor, locally a {type(local_leaf)}")
        tensor = flat_tensors[index]
        if not isinstance(tensor, torch.Tensor) or tensor.shape != local_leaf.shape:
            shape = getattr(tensor, "shape", None)
            raise OptimizerStateError(
                f"optimizer state tensor {index} has shape {shape}, the local one {tuple(local_leaf.shape)}"
            )
        if introduces_non_finite(tensor, local_leaf):
            raise OptimizerStateError(f"optimizer state tensor {index} holds inf/NaN, the local one does not")
        return tensor.to(dtype=local_leaf.dtype, device=local_leaf.device)
    value = entry.get("value")
    if isinstance(local_leaf, torch.Tensor) or not isinstance(value, _SCALAR_TYPES):
        raise OptimizerStateError(
            f"optimizer state entry {position} holds {type(value).__name__}, locally {type(local_leaf).__name__}"
        )
    if not _same_kind(value, local_leaf):  # e.g. a learning rate that is a string, None or NaN: the step would fail
        raise OptimizerStateError(
            f"optimizer state entry {position} holds {value!r:.50}, which cannot replace the local {local_leaf!r:.50}"
        )
    return value


def _kind(value: Any) -> str:
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return type(value).__name__
    return "number" if isinstance(value, (int, float)) else "other"


def _same_kind(value: Any, local_value: Any) -> bool:
    """Whether a donor's hyperparameter may replace the local one: a number by a number (finite where the local one
    is), a flag by a flag, a string by a string; None, the unset value of optional flags and choices (``foreach``,
    ``line_search_fn``), is interchangeable with a flag or a string."""
    kind, local_kind = _kind(value), _kind(local_value)
    if kind == "number" and local_kind == "number":
        return math.isfinite(value) or not math.isfinite(local_value)
    if kind == local_kind or local_kind == "other":  # (an exotic local value, e.g. a numpy scalar: as before)
        return True
    return {kind, local_kind} in ({"NoneType", "bool"}, {"NoneType", "str"})


@torch.no_grad()
def introduces_non_finite(tensor: torch.Tensor, local: torch.Tensor) -> bool:
    """Whether a donor's ``tensor`` holds inf/NaN where the ``local`` one it would replace holds none (such a value
    spreads to every parameter it touches; an honest peer's state is finite unless its training diverged)."""
    if not (tensor.is_floating_point() or tensor.is_complex()):
        return False
    return not bool(torch.isfinite(tensor).all()) and bool(torch.isfinite(local).all())


def shared_state_infos(tensors: Sequence[torch.Tensor], num_params: int, num_extras: int) -> List[CompressionInfo]:
    """CompressionInfo of a shared training state (parameters, extra tensors, optimizer tensors, in that order), as
    the original library makes them: each kind is numbered from 0 (the key a PerTensorCompression looks up) and has
    its role (PARAMETER, UNSPECIFIED, OPTIMIZER), which a RoleAdaptiveCompression picks a codec by."""
    kinds = [
        (0, TensorRole.PARAMETER),
        (num_params, TensorRole.UNSPECIFIED),
        (num_params + num_extras, TensorRole.OPTIMIZER),
    ]
    infos = []
    for index, tensor in enumerate(tensors):
        start, role = [kind for kind in kinds if index >= kind[0]][-1]
        infos.append(CompressionInfo.from_tensor(tensor, key=index - start, role=role))
    return infos
