"""FastAdam: torch.optim.Adam run by the fastest implementation the installed torch has for the given parameters."""

from __future__ import annotations

import threading
from typing import Any, Dict, Hashable, List, Mapping, Tuple

import torch

from hivemind.utils.logging import get_logger

__all__ = ["FastAdam", "choose_adam_implementation"]

logger = get_logger(__name__)

# torch's Adam has three implementations with the same arithmetic: a fused kernel per device (CPU since torch 2.4,
# several times faster than the others there), "foreach" kernels over lists of tensors, and a loop over tensors
IMPLEMENTATIONS = ("fused", "foreach", "for-loop")
_FLAGS = {"fused": dict(fused=True), "foreach": dict(foreach=True), "for-loop": dict(foreach=False)}
_probe_lock = threading.Lock()
# (device type, dtype, implementation, options that decide which implementation runs) -> it works
_probed: Dict[Tuple[str, torch.dtype, str, Hashable], bool] = {}
# hyperparameters that some implementations refuse: flags by their value, tensors (lr, betas...) by their kind
_PROBED_FLAGS = ("amsgrad", "maximize", "capturable", "decoupled_weight_decay")
_TENSOR_OPTIONS = ("lr", "betas", "eps", "weight_decay")


def _probe_options(options: Mapping[str, Any]) -> Tuple[Dict[str, Any], Hashable]:
    """The hyperparameters one probe step runs with (flags as given, tensor values as small copies; numbers stay
    the defaults: every implementation takes any number) and a key naming what the probe's answer depends on."""
    probe, key = {}, []
    for name in _PROBED_FLAGS:
        if name in options:
            probe[name] = bool(options[name])
            key.append((name, probe[name]))
    for name in _TENSOR_OPTIONS:
        value = options.get(name)
        values = value if isinstance(value, tuple) else (value,)
        if any(isinstance(item, torch.Tensor) for item in values):
            copies = tuple(item.detach().clone() if isinstance(item, torch.Tensor) else item for item in values)
            probe[name] = copies if isinstance(value, tuple) else copies[0]
            key.append((name, tuple(_kind(item) for item in values)))
    return probe, tuple(key)


def _kind(value: Any) -> Any:
    return (value.device.type, value.dtype) if isinstance(value, torch.Tensor) else None


def _step_without_hooks(optimizer: torch.optim.Optimizer) -> None:
    """optimizer.step() without the step hooks registered globally: a probe is not a step the user made."""
    step = type(optimizer).step
    if getattr(step, "hooked", False) and hasattr(step, "__wrapped__"):  # torch's wrapper that calls the hooks
        step = step.__wrapped__
    step(optimizer)


def _works(device: torch.device, dtype: torch.dtype, implementation: str, options: Mapping[str, Any]) -> bool:
    """Whether one Adam step of ``implementation`` with these hyperparameters runs on a tiny parameter of this
    device and dtype.

    Trying is the only check that holds for every torch >= 2.0: which devices, dtypes and hyperparameters each
    implementation supports changed between versions, and torch itself only checks some of them at the first step.
    """
    probe_options, options_key = _probe_options(options)
    key = (device.type, dtype, implementation, options_key)
    with _probe_lock:
        if key not in _probed:
            try:
                param = torch.zeros(2, dtype=dtype, device=device, requires_grad=True)
                param.grad = torch.ones_like(param)
                _step_without_hooks(torch.optim.Adam([param], **probe_options, **_FLAGS[implementation]))
                _probed[key] = bool(torch.isfinite(param.detach()).all())
            except Exception as e:  # any refusal (RuntimeError, NotImplementedError, TypeError...) means "not here"
                logger.debug(f"Adam implementation {implementation!r} does not run on {dtype} {device}: {e!r}")
                _probed[key] = False
        return _probed[key]


def _tensors_of(params) -> List[Any]:
    """The tensors of one group's params: a tensor, or an iterable of tensors or of (name, tensor) pairs."""
    if isinstance(params, torch.Tensor):
        return [params]
    return [item[1] if isinstance(item, tuple) and len(item) == 2 else item for item in params]


def choose_adam_implementation(params, **options: Any) -> str:
    """The fastest of IMPLEMENTATIONS that runs for every parameter (plain tensors of the same kinds) in ``params``
    (tensors, (name, tensor) pairs or param groups; iterated once per group, so pass lists, not generators) with
    the hyperparameters ``options`` (a group's own entries take precedence)."""
    needed = []  # (device, dtype, that group's hyperparameters)
    for item in params:
        group_options = dict(options, **item) if isinstance(item, dict) else options
        tensors = _tensors_of(item["params"] if isinstance(item, dict) else [item])
        if any(type(tensor) not in (torch.Tensor, torch.nn.Parameter) for tensor in tensors):
            return "for-loop"  # tensor subclasses: only the loop handles them everywhere
        kinds = {(tensor.device, tensor.dtype) for tensor in tensors}
        needed.extend((device, dtype, group_options) for device, dtype in kinds)
    for implementation in IMPLEMENTATIONS[:-1]:
        if all(_works(device, dtype, implementation, group_options) for device, dtype, group_options in needed):
            return implementation
    return "for-loop"


def _materialized(item):
    """A param group whose params are a one-shot iterable (e.g. module.parameters()) as a group with a list."""
    if isinstance(item, dict) and not isinstance(item.get("params"), (torch.Tensor, set, list, tuple)):
        return dict(item, params=list(item["params"]))
    return item


class FastAdam(torch.optim.Adam):
    """``torch.optim.Adam(params, **kwargs)`` (same hyperparameters and arithmetic, up to rounding), stepped by the
    fastest implementation that works for these parameters in the installed torch: the fused kernel, else the
    foreach kernels, else the per-tensor loop (:attr:`implementation` says which; chosen again at a step if the
    parameters moved to another device or dtype, or a param group was added). Passing ``fused``, ``foreach`` or
    ``differentiable`` yourself turns the choice off; a checkpoint then records that choice, as a plain Adam's does.

    Checkpoints stay those of a plain Adam: :meth:`state_dict` records no implementation, and
    :meth:`load_state_dict` keeps the one chosen here (a checkpoint from any Adam loads, on any machine).
    """

    def __init__(self, params, **kwargs: Any):
        self._choose = "fused" not in kwargs and "foreach" not in kwargs and not kwargs.get("differentiable", False)
        if not isinstance(params, torch.Tensor):  # a bare tensor: torch.optim.Adam refuses it with its own error
            items = [_materialized(item) for item in params]
            params = params if isinstance(params, set) else items  # a set: torch.optim.Adam decides what it says
        else:
            self._choose, items = False, []
        if self._choose:
            self.implementation = choose_adam_implementation(items, **kwargs)
            kwargs.update(_FLAGS[self.implementation])
        else:
            forced = "fused" if kwargs.get("fused") else "foreach" if kwargs.get("foreach") else "for-loop"
            self.implementation = forced
        super().__init__(params, **kwargs)
        self._chosen_for = self._parameter_kinds()

    def _parameter_kinds(self):  # what the choice depends on: the groups (each has its own options) and tensor kinds
        kinds = {(param.device, param.dtype) for group in self.param_groups for param in group["params"]}
        return len(self.param_groups), frozenset(kinds)

    def step(self, closure=None):
        if self._choose and self._parameter_kinds() != self._chosen_for:  # moved to another device, or add_param_group
            self.implementation = choose_adam_implementation(self.param_groups)
            for group in self.param_groups:
                group.update({"fused": None, "foreach": None, **_FLAGS[self.implementation]})
            self._chosen_for = self._parameter_kinds()
        return super().step(closure)

    def __getstate__(self) -> Dict[str, Any]:  # torch's optimizers pickle only their defaults, state and groups
        return dict(super().__getstate__(), _fast_adam=(self._choose, self.implementation, self._chosen_for))

    def __setstate__(self, state: Dict[str, Any]) -> None:
        state = dict(state)  # also called by load_state_dict, without our entry: then the choice stays
        if "_fast_adam" in state or not hasattr(self, "_choose"):
            self._choose, self.implementation, self._chosen_for = state.pop("_fast_adam", (False, "for-loop", None))
        super().__setstate__(state)

    def state_dict(self) -> Dict[str, Any]:
        state = super().state_dict()
        for group in state["param_groups"] if self._choose else ():  # an implementation the user chose stays
            group["fused"] = group["foreach"] = None  # what a plain Adam records: the loader picks its own
        return state

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        chosen = [(group.get("fused"), group.get("foreach")) for group in self.param_groups]
        super().load_state_dict(state_dict)
        for group, (fused, foreach) in zip(self.param_groups, chosen):
            group["fused"], group["foreach"] = fused, foreach
            for param in group["params"] if fused else ():  # the fused kernel keeps its step count by the parameter
                step = self.state.get(param, {}).get("step")
                if isinstance(step, torch.Tensor):
                    self.state[param]["step"] = step.to(dtype=torch.float32, device=param.device)
