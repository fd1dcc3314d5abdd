"""ModuleBackend: forward / backward equal to running the module locally, training on backward, schemas, checks."""

import copy
import pickle

import pytest
import torch
from torch import nn

from hivemind.moe.server.layers import ClippingWrapper, get_linear_schedule_with_warmup
from hivemind.moe.server.module_backend import InvalidInputsError, ModuleBackend
from hivemind.utils.tensor_descr import BatchTensorDescriptor


class TwoInputs(nn.Module):
    """out = linear(x) * scale, masked by an integer keyword input; returns a tuple and a dict."""

    def __init__(self, hidden=4):
        super().__init__()
        self.linear = nn.Linear(hidden, hidden)

    def forward(self, x, scale, *, mask):
        y = self.linear(x) * scale
        return y * mask, {"sum": y.sum(dim=1), "first": y[:, 0]}


def make_backend(module=None, lr=0.1, **kwargs):
    module = module or nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    optimizer = torch.optim.SGD(module.parameters(), lr=lr) if lr else None
    kwargs.setdefault("args_schema", (BatchTensorDescriptor(4),))
    kwargs.setdefault("max_batch_size", 16)
    return ModuleBackend("expert.0", module, optimizer=optimizer, **kwargs)


def test_forward_equals_the_module_run_locally():
    backend = make_backend()
    reference = copy.deepcopy(backend.module)
    x = torch.randn(5, 4)
    (output,) = backend.forward(x)
    assert not output.requires_grad
    assert torch.allclose(output, reference(x))


def test_backward_returns_input_gradients_of_the_local_module_and_trains_it():
    torch.manual_seed(1)
    backend = make_backend(lr=0.1)
    reference = copy.deepcopy(backend.module)
    reference_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    x, grad_output = torch.randn(6, 4), torch.randn(6, 3)

    (grad_x,) = backend.backward(x, grad_output)

    x_local = x.clone().requires_grad_()
    reference(x_local).backward(grad_output)
    reference_optimizer.step()
    assert torch.allclose(grad_x, x_local.grad, atol=1e-6)
    for param, reference_param in zip(backend.module.parameters(), reference.parameters()):
        assert torch.allclose(param, reference_param, atol=1e-6)  # the optimizer stepped once
        assert param.grad is None or not param.grad.any()  # and gradients were zeroed after it


def test_backward_without_optimizer_leaves_parameters_unchanged():
    backend = make_backend(lr=None)
    before = copy.deepcopy(backend.module.state_dict())
    backend.backward(torch.randn(2, 4), torch.randn(2, 3))
    for key, value in backend.module.state_dict().items():
        assert torch.equal(value, before[key])


def test_keyword_inputs_nested_outputs_and_integer_inputs():
    module = TwoInputs()
    backend = make_backend(
        module,
        lr=None,
        args_schema=(BatchTensorDescriptor(4), BatchTensorDescriptor(1)),
        kwargs_schema={"mask": BatchTensorDescriptor(4, dtype=torch.int64)},
    )
    info = backend.get_info()
    assert info["keyword_names"] == ("mask",)
    outputs_schema = info["outputs_schema"]
    assert outputs_schema[0].shape == (None, 4) and set(outputs_schema[1]) == {"sum", "first"}

    x, scale, mask = torch.randn(3, 4), torch.rand(3, 1), torch.randint(0, 2, (3, 4))
    outputs = backend.forward(x, scale, mask)
    expected, extra = module(x, scale, mask=mask)
    assert len(outputs) == 3  # flat: tuple item, then dict values by sorted key ("first", "sum")
    assert torch.allclose(outputs[0], expected)
    assert torch.allclose(outputs[1], extra["first"]) and torch.allclose(outputs[2], extra["sum"])

    grads = backend.backward(x, scale, mask, torch.ones(3, 4), torch.ones(3), torch.ones(3))
    assert [g.shape for g in grads] == [(3, 4), (3, 1), (3, 4)]
    assert grads[2].dtype == torch.int64 and not grads[2].any()  # integer input: zero gradient of its dtype


def test_outputs_schema_is_inferred_with_the_inputs_compression():
    backend = make_backend(args_schema=(BatchTensorDescriptor(4, compression=2),))
    assert backend.outputs_schema.shape == (None, 3)
    assert backend.outputs_schema.dtype == torch.float32
    assert backend.outputs_schema.compression == 2


def test_state_dict_round_trip_restores_module_and_optimizer():
    module = nn.Linear(4, 3)
    optimizer = torch.optim.Adam(module.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    backend = ModuleBackend(
        "expert.1",
        module,
        optimizer=optimizer,
        scheduler=scheduler,
        args_schema=(BatchTensorDescriptor(4),),
        max_batch_size=4,
    )
    backend.backward(torch.randn(2, 4), torch.randn(2, 3))
    saved = backend.state_dict()
    assert set(saved) == {"module", "optimizer", "scheduler"}
    backend.backward(torch.randn(2, 4), torch.randn(2, 3))
    assert not torch.equal(module.weight, saved["module"]["weight"])  # the snapshot is a copy
    backend.load_state_dict(saved)
    assert torch.equal(module.weight, saved["module"]["weight"])
    assert optimizer.state_dict()["state"][0]["step"] == 1
    assert scheduler.last_epoch == 1


def test_scheduler_without_optimizer_is_refused():
    module = nn.Linear(4, 3)
    scheduler = torch.optim.lr_scheduler.StepLR(torch.optim.SGD(module.parameters(), lr=1), step_size=1)
    with pytest.raises(ValueError, match="without an optimizer"):
        ModuleBackend("e.0", module, scheduler=scheduler, args_schema=(BatchTensorDescriptor(4),), max_batch_size=4)


def test_schema_and_max_batch_size_are_required():
    with pytest.raises(ValueError, match="args_schema"):
        ModuleBackend("e.0", nn.Linear(4, 3), max_batch_size=4)
    with pytest.raises(TypeError, match="max_batch_size"):
        ModuleBackend("e.0", nn.Linear(4, 3), args_schema=(BatchTensorDescriptor(4),))


def test_empty_batch_is_a_runtime_error():
    with pytest.raises(RuntimeError, match="empty batch"):
        make_backend().forward(torch.zeros(0, 4))


def test_pools_and_info():
    backend = make_backend()
    forward_pool, backward_pool = backend.get_pools()
    assert forward_pool is backend.forward_pool and backward_pool is backend.backward_pool
    assert forward_pool.max_batch_size == 16 and forward_pool.name == "expert.0_forward"
    assert backend.get_info()["forward_schema"] == ((BatchTensorDescriptor(4),), {})
    assert backend.backward_schema == (backend.forward_schema, backend.outputs_schema)


@pytest.mark.parametrize(
    "tensors, message",
    [
        ((torch.randn(2, 4), torch.randn(2, 4)), "expects 1 tensors, got 2"),
        ((torch.randn(2, 5),), r"shape \[2, 5\], expected \[batch_size, 4\]"),
        ((torch.randn(2, 4, 1),), "shape"),
        ((torch.randn(2, 4, dtype=torch.float64),), "dtype torch.float64, expected torch.float32"),
        ((torch.randn(0, 4),), "empty"),
        ((torch.randn(17, 4),), "max_batch_size=16"),
        (([1.0, 2.0],), "not a tensor"),
    ],
)
def test_malformed_forward_request_is_rejected_with_the_reason(tensors, message):
    backend = make_backend(args_schema=(BatchTensorDescriptor(4, dtype=torch.float32),))
    with pytest.raises(InvalidInputsError, match=message):
        backend.check_forward_inputs(tensors)


def test_backward_request_checks_inputs_then_output_gradients():
    backend = make_backend()
    assert backend.check_backward_inputs((torch.randn(3, 4), torch.randn(3, 3))) == 3
    with pytest.raises(InvalidInputsError, match="input #1 has shape"):
        backend.check_backward_inputs((torch.randn(3, 4), torch.randn(3, 4)))
    with pytest.raises(InvalidInputsError, match="batch size 2, but input #0 has 3"):
        backend.check_backward_inputs((torch.randn(3, 4), torch.randn(2, 3)))


class FailingBackwardOnce(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 3)
        self.fail = True

    def forward(self, x):
        return FailInBackward.apply(self.linear(x), self)


class FailInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, owner):
        ctx.owner = owner
        return y.clone()

    @staticmethod
    def backward(ctx, grad):
        if ctx.owner.fail:  # some gradients were accumulated before the failure
            ctx.owner.linear.weight.grad = torch.ones_like(ctx.owner.linear.weight)
            raise RuntimeError("backward exploded")
        return grad, None


def test_failed_backward_leaves_no_gradient_for_the_next_batch():
    module = FailingBackwardOnce()
    backend = make_backend(module, lr=None)
    weight = module.linear.weight.detach().clone()
    with pytest.raises(RuntimeError, match="backward exploded"):
        backend.backward(torch.randn(2, 4), torch.randn(2, 3))
    assert module.linear.weight.grad is None
    assert torch.equal(module.linear.weight, weight)


def test_backend_with_wrapped_optimizer_and_schedule_pickles_for_other_processes():
    module = nn.Linear(4, 3)
    optimizer = ClippingWrapper(torch.optim.Adam(module.parameters()), clip_grad_norm=1.0)
    scheduler = get_linear_schedule_with_warmup(optimizer, num_warmup_steps=2, num_training_steps=10)
    backend = ModuleBackend(
        "expert.2",
        module,
        optimizer=optimizer,
        scheduler=scheduler,
        args_schema=(BatchTensorDescriptor(4),),
        max_batch_size=4,
    )
    copy_ = pickle.loads(pickle.dumps(backend))
    assert copy_.get_info() == backend.get_info()
    assert copy_.forward_pool is backend.forward_pool  # unpickled in the owner process: the very same pools
    assert set(copy_.state_dict()) == {"module", "optimizer", "scheduler"}  # with a working lock of its own


@pytest.mark.parametrize("wrap", [False, True], ids=["adam", "clipping-wrapped-adam"])
def test_moving_a_backend_moves_its_optimizer_state_next_to_the_parameters(wrap):
    """A checkpoint restores Adam's moments where it was loaded (the CPU); the Runtime moves the expert to its
    device afterwards, and the moments must follow (checked with the data-less "meta" device, the only other device
    a CPU-only machine has)."""
    module = nn.Linear(4, 3)
    optimizer = torch.optim.Adam(module.parameters(), lr=0.1)
    if wrap:
        optimizer = ClippingWrapper(optimizer, clip_grad_norm=1.0)
    backend = ModuleBackend(
        "expert.0", module, optimizer=optimizer, args_schema=(BatchTensorDescriptor(4),), max_batch_size=4
    )
    backend.backward(torch.randn(2, 4), torch.randn(2, 3))  # creates the moments, on the CPU

    # moving to CUDA keeps each Parameter object (the optimizer's references stay valid); to "meta" it would make new
    # ones unless the tensors are swapped in place
    swapping = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        backend.move_to(torch.device("meta"))
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swapping)

    inner = optimizer.inner if wrap else optimizer
    moments = [value for state in inner.state.values() for key, value in state.items() if key != "step"]
    assert moments and all(value.device.type == "meta" for value in moments)
    assert all(param.device.type == "meta" for group in inner.param_groups for param in group["params"])
