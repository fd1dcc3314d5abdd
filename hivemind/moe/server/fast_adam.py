"""FastAdam: torch.optim.Adam run by the fastest implementation the installed torch has for the given parameters."""

from __future__ import annotations

import threading
from typing import Any, Dict, Tuple

import torch

from hivemind.utils.logging import get_logger

__all__ = ["FastAdam", "choose_adam_implementation"]

logger = get_logger(__name__)

# torch's Adam has three implementations with the same arithmetic: a fused kernel per device (CPU since torch 2.4,
# several times faster than the others there), "foreach" kernels over lists of tensors, and a loop over tensors
IMPLEMENTATIONS = ("fused", "foreach", "for-loop")
_FLAGS = {"fused": dict(fused=True), "foreach": dict(foreach=True), "for-loop": dict(foreach=False)}
_probe_lock = threading.Lock()
_probed: Dict[Tuple[str, torch.dtype, str], bool] = {}  # (device type, dtype, implementation) -> it works


def _works(device: torch.device, dtype: torch.dtype, implementation: str) -> bool:
    """Whether one Adam step of ``implementation`` runs on a tiny parameter of this device and dtype.

    Trying is the only check that holds for every torch >= 2.0: which devices and dtypes each implementation
    supports changed between versions, and torch itself only checks at the first step.
    """
    key = (device.type, dtype, implementation)
    with _probe_lock:
        if key not in _probed:
            try:
                param = torch.zeros(2, dtype=dtype, device=device, requires_grad=True)
                param.grad = torch.ones_like(param)
                torch.optim.Adam([param], **_FLAGS[implementation]).step()
                _probed[key] = bool(torch.isfinite(param.detach()).all())
            except Exception as e:  # any refusal (RuntimeError, NotImplementedError, TypeError...) means "not here"
                logger.debug(f"Adam implementation {implementation!r} does not run on {dtype} {device}: {e!r}")
                _probed[key] = False
        return _probed[key]


def choose_adam_implementation(params) -> str:
    """The fastest of IMPLEMENTATIONS that runs for every parameter (plain tensors of the same kinds) in ``params``."""
    tensors = []
    for item in params:  # tensors, or param groups: dicts whose "params" is a tensor or an iterable of them
        group = item["params"] if isinstance(item, dict) else item
        tensors.extend([group] if isinstance(group, torch.Tensor) else group)
    if any(type(tensor) not in (torch.Tensor, torch.nn.Parameter) for tensor in tensors):
        return "for-loop"  # tensor subclasses: only the loop handles them everywhere
    kinds = {(tensor.device, tensor.dtype) for tensor in tensors}
    for implementation in IMPLEMENTATIONS[:-1]:
        if all(_works(device, dtype, implementation) for device, dtype in kinds):
            return implementation
    return "for-loop"


class FastAdam(torch.optim.Adam):
    """``torch.optim.Adam(params, **kwargs)`` (same hyperparameters and arithmetic, up to rounding), stepped by the
    fastest implementation that works for these parameters in the installed torch: the fused kernel, else the
    foreach kernels, else the per-tensor loop (:attr:`implementation` says which; chosen again at a step if the
    parameters moved to another device or dtype). Passing ``fused``, ``foreach`` or ``differentiable`` yourself turns
    the choice off.

    Checkpoints stay those of a plain Adam: :meth:`state_dict` records no implementation, and
    :meth:`load_state_dict` keeps the one chosen here (a checkpoint from any Adam loads, on any machine).
    """

    def __init__(self, params, **kwargs: Any):
        params = list(params)
        self._choose = "fused" not in kwargs and "foreach" not in kwargs and not kwargs.get("differentiable", False)
        if self._choose:
            self.implementation = choose_adam_implementation(params)
            kwargs.update(_FLAGS[self.implementation])
        else:
            forced = "fused" if kwargs.get("fused") else "foreach" if kwargs.get("foreach") else "for-loop"
            self.implementation = forced
        super().__init__(params, **kwargs)
        self._chosen_for = self._parameter_kinds()

    def _parameter_kinds(self):
        return {(param.device, param.dtype) for group in self.param_groups for param in group["params"]}

    def step(self, closure=None):
        if self._choose and self._parameter_kinds() != self._chosen_for:  # e.g. the module moved to another device
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
            self._choose, self.implementation, self._chosen_for = state.pop("_fast_adam", (False, "for-loop", set()))
        super().__setstate__(state)

    def state_dict(self) -> Dict[str, Any]:
        state = super().state_dict()
        for group in state["param_groups"]:
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
