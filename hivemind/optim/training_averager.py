"""TrainingAverager (legacy): averages an optimizer's parameters, gradients and statistics with peers on demand."""

from __future__ import annotations

import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from hivemind.averaging.averager import DecentralizedAverager
from hivemind.averaging.state_snapshot import packed_copy
from hivemind.compression import CompressionInfo, TensorRole
from hivemind.optim.optimizer_state import (
    dump_optimizer_state,
    initialize_optimizer_state_,
    introduces_non_finite,
    load_optimizer_state,
    shared_state_infos,
)
from hivemind.optim.state_loading import load_first_accepted_state, load_state_without_statistics
from hivemind.utils.logging import get_logger

__all__ = ["TrainingAverager"]

logger = get_logger(__name__)


class TrainingAverager(DecentralizedAverager):
    """
    The older, simpler interface: each :meth:`step` copies the optimizer's parameters (and optionally gradients,
    chosen optimizer statistics, extra tensors) into the averager, averages them with a group of peers and copies the
    result back. New code should use :class:`hivemind.Optimizer`.

    :param opt: a torch optimizer whose parameters are averaged
    :param average_parameters: average the parameters
    :param average_gradients: average the parameters' ``.grad``
    :param average_opt_statistics: names of optimizer-state entries to average (e.g. ``"exp_avg_sq"``)
    :param extra_tensors: more tensors to average
    :param parameter_names: names of the parameters (for logs)
    :param initialize_optimizer: create the optimizer's statistics first (needed to average or share them)
    :param averager_kwargs: options of :class:`DecentralizedAverager` (``dht``, ``prefix``, ``start``, ...)
    """

    # fmt: off
    def __init__(self, opt: torch.optim.Optimizer, *, average_parameters: bool, average_gradients: bool,
                 average_opt_statistics: Sequence[str] = (), extra_tensors: Sequence[torch.Tensor] = (),
                 parameter_names: Optional[Sequence[str]] = None, initialize_optimizer: bool = True,
                 **averager_kwargs):
        # fmt: on
        if initialize_optimizer:
            initialize_optimizer_state_(opt)
        self.opt, self.local_step = opt, 0
        self.extra_tensors = tuple(extra_tensors)
        self.average_parameters = average_parameters
        self.average_gradients = average_gradients
        self.average_opt_statistics = tuple(average_opt_statistics)
        self.parameters = tuple(param for group in opt.param_groups for param in group["params"])
        self.parameter_names = tuple(parameter_names or (f"param{i}" for i in range(len(self.parameters))))
        self.opt_lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=type(self).__name__)
        with torch.no_grad():
            averaged = [tensor.detach().to("cpu", copy=True) for tensor, _, _ in self._local_tensors()]
        infos = [CompressionInfo.from_tensor(t, key=key, role=role) for t, (_, key, role) in
                 zip(averaged, self._local_tensors())]  # fmt: skip
        super().__init__(averaged_tensors=averaged, tensor_infos=infos, **averager_kwargs)

    def __getstate__(self) -> Dict[str, Any]:
        """What a spawned (or forkserver) averager process receives: the averaging side only, not the optimizer, its
        parameters (maybe on a GPU), the extra tensors, the lock or the thread; the averaged copies are shared."""
        state = super().__getstate__()
        for name in ("opt", "parameters", "extra_tensors", "opt_lock", "_executor"):
            state.pop(name, None)
        return state

    def _local_tensors(self) -> List[Tuple[torch.Tensor, Any, TensorRole]]:
        """(tensor, key, role) of each averaged tensor, with the original library's keys (what a PerTensorCompression
        looks up): parameter and gradient ``i`` key ``i``, a statistic ``(i, name)``, extra tensor ``j`` key ``j``"""
        tensors = []
        if self.average_parameters:
            tensors += [(param, index, TensorRole.PARAMETER) for index, param in enumerate(self.parameters)]
        if self.average_gradients:
            for index, param in enumerate(self.parameters):
                if param.grad is None:
                    param.grad = torch.zeros_like(param)
                tensors.append((param.grad, index, TensorRole.GRADIENT))
        for name in self.average_opt_statistics:
            tensors += [
                (self.opt.state[param][name], (index, name), TensorRole.OPTIMIZER)
                for index, param in enumerate(self.parameters)
            ]
        tensors += [(tensor, index, TensorRole.UNSPECIFIED) for index, tensor in enumerate(self.extra_tensors)]
        return tensors

    def step(self, data_lock: Optional[threading.Lock] = None, wait: bool = True, **step_kwargs):
        """
        Average once. With ``data_lock``, the tensors may change while averaging runs: they are read and updated under
        that lock, and the update adds (average - values sent) so that local changes meanwhile are kept.
        Returns the gathered dict (``wait=True``) or a Future of it.
        """
        future = self._executor.submit(self._step, data_lock, step_kwargs)
        return future.result() if wait else future

    @torch.no_grad()
    def _step(self, data_lock: Optional[threading.Lock], step_kwargs: Dict[str, Any]) -> Any:
        lock = data_lock if data_lock is not None else contextlib.nullcontext()
        with lock, self.get_tensors() as averaged:
            local = [tensor for tensor, _, _ in self._local_tensors()]
            for buffer, tensor in zip(averaged, local):
                buffer.copy_(tensor)
            sent = [buffer.clone() for buffer in averaged] if data_lock is not None else None
        gathered = DecentralizedAverager.step(self, **step_kwargs)
        with lock, self.get_tensors() as averaged:
            for index, (buffer, tensor) in enumerate(zip(averaged, local)):
                if sent is None:
                    tensor.copy_(buffer)
                else:
                    tensor.add_(buffer.to(tensor.device) - sent[index].to(tensor.device))
        self.local_step += 1
        return gathered

    def get_current_state(self) -> Tuple[Dict[str, Any], List[torch.Tensor], List[CompressionInfo]]:
        with torch.no_grad(), self.opt_lock:
            flat_optimizer_state, optimizer_tensors = dump_optimizer_state(self.opt)
            tensors = packed_copy([*self.parameters, *self.extra_tensors, *optimizer_tensors])
        metadata = {"step": self.local_step, "group_bits": self.get_group_bits()}
        metadata["optimizer_metadata"] = flat_optimizer_state
        return metadata, tensors, shared_state_infos(tensors, len(self.parameters), len(self.extra_tensors))

    def load_state_from_peers(self, **kwargs) -> Optional[Tuple[Dict[str, Any], List[torch.Tensor]]]:
        """Download and apply the best peer's parameters, extra tensors, optimizer state and step counter."""
        if not self.opt.state:  # (initialize_optimizer=False): donors may share statistics or none
            num_local = len(self.parameters) + len(self.extra_tensors)
            return load_state_without_statistics(
                self, self.opt, self.opt_lock, self._apply_downloaded_state, num_local, **kwargs
            )
        return load_first_accepted_state(self, self._apply_downloaded_state, **kwargs)

    def _apply_downloaded_state(self, metadata: Any, tensors: List[torch.Tensor]) -> None:
        """Check a donor's state (ValueError or OptimizerStateError if unusable; then nothing changes) and apply it."""
        local = [*self.parameters, *self.extra_tensors]
        step = metadata.get("step") if isinstance(metadata, dict) else None
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ValueError(f"the donor's metadata is not a TrainingAverager state: {metadata!r:.100}")
        if len(tensors) < len(local) or any(a.shape != b.shape for a, b in zip(local, tensors)):
            raise ValueError("the donor's tensors do not match the local parameters")
        if any(introduces_non_finite(theirs, mine) for mine, theirs in zip(local, tensors)):
            raise ValueError("the donor's parameters or extra tensors hold inf/NaN, the local ones do not")
        with torch.no_grad(), self.opt_lock:
            load_optimizer_state(self.opt, metadata.get("optimizer_metadata"), list(tensors[len(local) :]))
            for mine, theirs in zip(local, tensors):
                mine.copy_(theirs)
        self.local_step = step

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False)
        super().shutdown()
