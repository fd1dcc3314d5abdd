"""ModuleBackend: one hosted expert — its module, schemas, optimizer and the two task pools that feed it."""

from __future__ import annotations

import threading
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
from torch.optim import Optimizer

from hivemind.moe.server.create_arguments import check_backend_arguments
from hivemind.moe.server.task_pool import SkippedUpdateError, TaskPool
from hivemind.utils.logging import get_logger
from hivemind.utils.nested import nested_flatten, nested_map, nested_pack
from hivemind.utils.tensor_descr import DUMMY_BATCH_SIZE, BatchTensorDescriptor

__all__ = ["ModuleBackend", "InvalidInputsError", "check_inputs"]

logger = get_logger(__name__)


class InvalidInputsError(ValueError):
    """Tensors of a request that do not match the expert's schema; the message names the problem."""


def check_inputs(
    tensors: Sequence[Any], schema: Sequence[BatchTensorDescriptor], max_batch_size: int, what: str = "request"
) -> int:
    """Check one request's flat tensors against flat descriptors; return its batch size.

    Checks, in order: the number of tensors, that each is a dense tensor with the descriptor's dtype and per-example
    shape and no NaN / inf values, that all share one batch size, and that the batch size is within
    ``[1, max_batch_size]``.
    :raises InvalidInputsError: naming the first problem found
    """
    if len(tensors) != len(schema):
        raise InvalidInputsError(f"{what} expects {len(schema)} tensors, got {len(tensors)}")
    batch_size = None
    for index, (tensor, descriptor) in enumerate(zip(tensors, schema)):
        if not isinstance(tensor, torch.Tensor):
            raise InvalidInputsError(f"{what}: input #{index} is a {type(tensor).__name__}, not a tensor")
        if tensor.layout != torch.strided:
            raise InvalidInputsError(f"{what}: input #{index} has layout {tensor.layout}, expected a dense tensor")
        expected_shape = tuple(descriptor.shape[1:])
        if tensor.ndim != len(expected_shape) + 1 or tuple(tensor.shape[1:]) != expected_shape:
            expected = ", ".join(["batch_size", *map(str, expected_shape)])
            raise InvalidInputsError(f"{what}: input #{index} has shape {list(tensor.shape)}, expected [{expected}]")
        if descriptor.dtype is not None and tensor.dtype != descriptor.dtype:
            raise InvalidInputsError(f"{what}: input #{index} has dtype {tensor.dtype}, expected {descriptor.dtype}")
        if not _all_finite(tensor):  # one such row would poison the whole batch's update (and other callers' rows)
            raise InvalidInputsError(f"{what}: input #{index} contains NaN or infinite values; send finite values")
        if batch_size is None:
            batch_size = tensor.shape[0]
        elif tensor.shape[0] != batch_size:
            raise InvalidInputsError(
                f"{what}: input #{index} has batch size {tensor.shape[0]}, but input #0 has {batch_size}"
            )
    if not batch_size:
        raise InvalidInputsError(f"{what}: the batch is empty (batch size 0); send at least one example")
    if batch_size > max_batch_size:
        raise InvalidInputsError(
            f"{what}: batch size {batch_size} exceeds max_batch_size={max_batch_size}; split it into smaller batches"
        )
    return batch_size


def _all_finite(tensor: torch.Tensor) -> bool:
    """Whether a tensor holds no NaN / inf (integer tensors always do); a finite sum proves it in one pass."""
    if not (tensor.is_floating_point() or tensor.is_complex()) or tensor.numel() == 0:
        return True
    if torch.isfinite(tensor.sum()).item():
        return True
    return bool(torch.isfinite(tensor).all())  # the sum may overflow with large finite values: check each one


class ModuleBackend:
    """
    Hosts one expert: runs forward and backward passes over batches and trains the module on every backward.

    All inputs and outputs of the module are batch-first tensors. Flat inputs are the positional arguments in order,
    then keyword arguments by sorted name; outputs are flattened the same way.

    :param name: the expert uid (also the prefix of the pool names)
    :param module: the nn.Module to host (on the device where it will run)
    :param optimizer: stepped (then zeroed) after each backward batch; None = the module is not trained
    :param scheduler: stepped after the optimizer; requires an optimizer
    :param args_schema: BatchTensorDescriptors of positional inputs
    :param kwargs_schema: {name: BatchTensorDescriptor} of keyword inputs (at least one of the two schemas is needed)
    :param outputs_schema: descriptor(s) of the outputs; by default found by running the module on a dummy batch of
      DUMMY_BATCH_SIZE examples (recorded as CPU tensors, with the inputs' compression if they all share one), and
      then each forward batch's outputs must match it. A schema given here is passed to clients as it is, without
      checking the outputs against it, as in hivemind 1.1.12 (petals declares placeholder shapes such as
      ``BatchTensorDescriptor(1, 2048, hidden_size)`` for any sequence length); outputs of the module past the
      ones it describes are not served (backward still needs the module to return exactly those)
    :param kwargs: for both TaskPools: max_batch_size (required), min_batch_size, timeout, pool_size, prefetch_batches
    """

    def __init__(
        self,
        name: str,
        module: torch.nn.Module,
        *,
        optimizer: Optional[Optimizer] = None,
        scheduler: Optional[Any] = None,
        args_schema: Optional[Tuple[BatchTensorDescriptor, ...]] = None,
        kwargs_schema: Optional[Dict[str, BatchTensorDescriptor]] = None,
        outputs_schema: Union[BatchTensorDescriptor, Sequence[BatchTensorDescriptor], None] = None,
        **kwargs,
    ):
        if args_schema is None and kwargs_schema is None:
            raise ValueError(f"{name}: give args_schema and/or kwargs_schema (descriptors of the module's inputs)")
        check_backend_arguments(module, optimizer, args_schema, kwargs_schema)
        if scheduler is not None and optimizer is None:
            raise ValueError(f"{name}: a scheduler was given without an optimizer; pass the optimizer it schedules")
        if "max_batch_size" not in kwargs:
            raise TypeError(f"{name}: max_batch_size is required (the largest batch the expert may process)")
        self.name = name
        self.module = module
        self.optimizer, self.scheduler = optimizer, scheduler
        self.args_schema = tuple(args_schema or ())
        self.kwargs_schema = dict(kwargs_schema or {})
        self.forward_schema = (self.args_schema, self.kwargs_schema)
        self._flat_inputs_schema = tuple(nested_flatten(self.forward_schema))
        self._check_outputs_against_schema = outputs_schema is None  # (a schema we inferred, see above)
        if outputs_schema is None:
            outputs_schema = self._infer_outputs_schema()
        self.outputs_schema = outputs_schema
        self._flat_outputs_schema = tuple(nested_flatten(self.outputs_schema))
        self.grad_inputs_schema = self.forward_schema
        self.backward_schema = (self.forward_schema, self.outputs_schema)
        self._update_lock = threading.RLock()  # parameters / optimizer state change only under it

        self.forward_pool = TaskPool(self.forward, name=f"{self.name}_forward", **kwargs)
        self.backward_pool = TaskPool(self.backward, name=f"{self.name}_backward", **kwargs)

    def move_to(self, device: torch.device) -> None:
        """Move the module to ``device``, and the optimizer's state along with it.

        A checkpoint is loaded before the Runtime moves the experts to their device, so the optimizer's state (e.g.
        Adam's moments) is still where the checkpoint put it; left there, the first step would mix devices. Loading
        the optimizer's own state dict again places every state tensor the way the optimizer wants it for its
        parameters (next to them, or on the CPU for a scalar step counter)."""
        with self._update_lock:
            self.module.to(device)
            if self.optimizer is not None:
                state_dict = self.optimizer.state_dict()
                if state_dict.get("state"):  # (tensors already in place are not copied)
                    self.optimizer.load_state_dict(state_dict)

    def _module_device(self) -> torch.device:
        for tensor in self.module.parameters():
            return tensor.device
        for tensor in self.module.buffers():
            return tensor.device
        return torch.device("cpu")

    def _infer_outputs_schema(self):
        device = self._module_device()
        sample_args = tuple(d.make_zeros(DUMMY_BATCH_SIZE, device=device) for d in self.args_schema)
        sample_kwargs = {key: d.make_zeros(DUMMY_BATCH_SIZE, device=device) for key, d in self.kwargs_schema.items()}
        with torch.no_grad():
            sample_outputs = self.module(*sample_args, **sample_kwargs)
        floating = [d for d in self._flat_inputs_schema if d.dtype is None or d.dtype.is_floating_point]
        compressions = {d.compression for d in floating}
        compression = compressions.pop() if len(compressions) == 1 else None
        extra = {} if compression is None else {"compression": compression}
        return nested_map(lambda t: BatchTensorDescriptor.from_tensor(t.detach().cpu(), **extra), sample_outputs)

    # ------------------------------------------------------------------ request checks

    def check_forward_inputs(self, tensors: Sequence[torch.Tensor]) -> int:
        """Check the flat inputs of one forward request (before it becomes a task); returns the batch size."""
        max_batch_size = self.forward_pool.max_batch_size
        return check_inputs(tensors, self._flat_inputs_schema, max_batch_size, f"{self.name} forward")

    def check_backward_inputs(self, tensors: Sequence[torch.Tensor]) -> int:
        """Check the flat inputs of one backward request: forward inputs, then gradients of every output."""
        schema = (*self._flat_inputs_schema, *self._flat_outputs_schema)
        what = f"{self.name} backward (inputs, then gradients of the outputs)"
        return check_inputs(tensors, schema, self.backward_pool.max_batch_size, what)

    # ------------------------------------------------------------------ computation (called by the Runtime)

    def _split_inputs(self, flat_inputs: Sequence[torch.Tensor]):
        args, kwargs = nested_pack(flat_inputs, structure=self.forward_schema)
        return args, kwargs

    def forward(self, *inputs: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """Apply the module to a batch without tracking gradients; returns the flat outputs."""
        if not inputs or inputs[0].ndim == 0 or inputs[0].shape[0] == 0:
            raise RuntimeError(f"{self.name}: forward got an empty batch")
        args, kwargs = self._split_inputs(inputs)
        with torch.no_grad():
            outputs = self.module(*args, **kwargs)
        flat_outputs = tuple(nested_flatten(outputs))
        if not self._check_outputs_against_schema:  # as 1.1.12: outputs past a declared schema are not served
            flat_outputs = flat_outputs[: len(self._flat_outputs_schema)]
        if len(flat_outputs) != len(self._flat_outputs_schema):
            raise RuntimeError(
                f"{self.name}: the module returned {len(flat_outputs)} outputs, outputs_schema describes "
                f"{len(self._flat_outputs_schema)}"
            )
        if self._check_outputs_against_schema:
            self._check_outputs(flat_outputs, batch_size=inputs[0].shape[0])
        return flat_outputs

    def _check_outputs(self, outputs: Sequence[Any], batch_size: int) -> None:
        """Outputs must be what outputs_schema promises to clients (they size their buffers and checks by it)."""
        for index, (output, descriptor) in enumerate(zip(outputs, self._flat_outputs_schema)):
            if not isinstance(output, torch.Tensor):
                raise RuntimeError(f"{self.name}: output #{index} of the module is a {type(output).__name__}")
            expected_shape = (batch_size, *descriptor.shape[1:])
            if tuple(output.shape) != expected_shape:
                raise RuntimeError(
                    f"{self.name}: output #{index} of the module has shape {list(output.shape)}, but outputs_schema "
                    f"promises {list(expected_shape)} for this batch; fix the module or its outputs_schema"
                )
            if descriptor.dtype is not None and output.dtype != descriptor.dtype:
                raise RuntimeError(
                    f"{self.name}: output #{index} of the module has dtype {output.dtype}, but outputs_schema "
                    f"promises {descriptor.dtype}; fix the module or its outputs_schema"
                )

    def backward(self, *inputs_and_grads: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """Recompute the forward pass with gradients, backpropagate the given output gradients and train.

        :param inputs_and_grads: flat inputs followed by the gradients of the flat outputs
        :returns: gradients of every flat input (zeros for inputs that got none, e.g. integer masks)
        """
        num_inputs, num_outputs = len(self._flat_inputs_schema), len(self._flat_outputs_schema)
        if len(inputs_and_grads) != num_inputs + num_outputs:
            raise RuntimeError(
                f"{self.name}: backward expects {num_inputs} inputs and {num_outputs} output gradients, "
                f"got {len(inputs_and_grads)} tensors"
            )
        inputs = [
            tensor.detach().requires_grad_(tensor.is_floating_point() or tensor.is_complex())
            for tensor in inputs_and_grads[:num_inputs]
        ]
        grad_outputs = inputs_and_grads[num_inputs:]
        if not inputs or inputs[0].ndim == 0 or inputs[0].shape[0] == 0:
            raise RuntimeError(f"{self.name}: backward got an empty batch")
        batch_size = inputs[0].shape[0]
        args, kwargs = self._split_inputs(inputs)
        with self._update_lock:
            try:
                with torch.enable_grad():
                    outputs = tuple(nested_flatten(self.module(*args, **kwargs)))
                    if len(outputs) != num_outputs:
                        raise RuntimeError(
                            f"{self.name}: the module returned {len(outputs)} outputs, not {num_outputs}"
                        )
                    pairs = [(out, grad) for out, grad in zip(outputs, grad_outputs) if out.requires_grad]
                    if pairs:
                        torch.autograd.backward([out for out, _ in pairs], grad_tensors=[grad for _, grad in pairs])
            except BaseException:
                self.module.zero_grad(set_to_none=True)  # a failed batch must not leave gradients for the next one
                raise
            grads = tuple(
                tensor.grad if tensor.grad is not None else torch.zeros_like(tensor).detach() for tensor in inputs
            )
            if self.optimizer is not None and not self._parameter_grads_finite():
                # a batch of several requests is then retried one request at a time (see TaskPool), so that the
                # requests batched with an overflowing one are still applied; a request alone (e.g. an fp16 expert's
                # occasional overflow) gets its input gradients, its update skipped as a GradScaler would skip it
                self.module.zero_grad(set_to_none=True)
                raise SkippedUpdateError(
                    f"{self.name}: the parameter gradients of this backward batch are not finite (finite values "
                    "whose update overflows); the update is skipped",
                    grads,
                )
            self.on_backward(batch_size)
        return grads

    def on_backward(self, batch_size: int) -> None:
        """Train after a backward batch: optimizer step and zero_grad, then scheduler step.

        A batch whose parameter gradients are not all finite (finite inputs can still overflow) is not applied: one
        such step would leave NaN / inf parameters, and the expert would answer NaN to everyone from then on.
        """
        with self._update_lock:
            if self.optimizer is None:
                self.module.zero_grad(set_to_none=True)  # not trained: do not let gradients accumulate
                return
            if not self._parameter_grads_finite():
                logger.warning(f"{self.name}: gradients of a backward batch are not finite; this update is skipped")
                self.module.zero_grad(set_to_none=True)
                return
            try:
                self.optimizer.step()
            finally:  # a step that failed must not leave its gradients to be added to the next batch's
                self.optimizer.zero_grad()
            if self.scheduler is not None:
                self.scheduler.step()

    def _parameter_grads_finite(self) -> bool:
        return all(p.grad is None or _all_finite(p.grad) for p in self.module.parameters())

    # ------------------------------------------------------------------ info and state

    def get_info(self) -> Dict[str, Any]:
        """What clients need to call this expert (sent by rpc_info)."""
        keyword_names = tuple(self.kwargs_schema)
        return {
            "forward_schema": self.forward_schema,
            "outputs_schema": self.outputs_schema,
            "keyword_names": keyword_names,
        }

    def get_pools(self) -> Sequence[TaskPool]:
        """The pools the Runtime serves for this expert."""
        return self.forward_pool, self.backward_pool

    def state_dict(self) -> Dict[str, Any]:
        """A consistent snapshot (copies) of module, optimizer and scheduler state, taken between training steps."""
        with self._update_lock:
            state = dict(module=self.module.state_dict())
            if self.optimizer is not None:
                state["optimizer"] = self.optimizer.state_dict()
            if self.scheduler is not None:
                state["scheduler"] = self.scheduler.state_dict()
            return _clone_tensors(state)

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Restore what state_dict saved (the optimizer / scheduler parts only where this backend has them).

        All or nothing: if any part does not fit (e.g. the state of another expert class), the module, optimizer and
        scheduler are put back as they were and the error is raised.
        """
        if not isinstance(state_dict, dict) or not isinstance(state_dict.get("module"), dict):
            found = sorted(map(str, state_dict))[:5] if isinstance(state_dict, dict) else type(state_dict).__name__
            raise ValueError(
                f"{self.name}: expected a ModuleBackend state dict with a 'module' entry (and optionally 'optimizer', "
                f"'scheduler'), got {found}"
            )
        with self._update_lock:
            previous = self.state_dict()
            try:
                self._load_parts(state_dict)
            except BaseException:
                self._load_parts(previous)
                raise

    def _load_parts(self, state: Dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        for key, target in (("optimizer", self.optimizer), ("scheduler", self.scheduler)):
            if target is not None and key in state:
                target.load_state_dict(state[key])

    def __getstate__(self):
        state = self.__dict__.copy()
        del state["_update_lock"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._update_lock = threading.RLock()


def _clone_tensors(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        copy = type(value)((key, _clone_tensors(item)) for key, item in value.items())
        if hasattr(value, "_metadata"):  # module state dicts carry per-module versions used when loading
            copy._metadata = value._metadata
        return copy
    if isinstance(value, list):
        return [_clone_tensors(item) for item in value]
    if isinstance(value, tuple):
        return tuple(_clone_tensors(item) for item in value)
    return value
