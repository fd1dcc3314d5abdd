"""An expert module whose outputs break its own outputs_schema fails its callers clearly (it answered them)."""

import pytest
import torch
from torch import nn

from hivemind.moe.server.module_backend import ModuleBackend
from hivemind.moe.server.runtime import Runtime
from hivemind.utils.tensor_descr import BatchTensorDescriptor


class WidensOnLargeInputs(nn.Module):
    """Returns [batch, 2] normally, [batch, 3] when an input is above 100 (its schema was inferred at [batch, 2])."""

    def forward(self, x):
        if (x > 100).any():
            return torch.cat([x, x[:, :1]], dim=1)
        return x * 2


class DoublesOnLargeInputs(nn.Module):
    def forward(self, x):
        return x.double() if (x > 100).any() else x * 2


@pytest.fixture
def served():
    runtimes = []

    def serve(module: nn.Module) -> ModuleBackend:
        backend = ModuleBackend("expert.0", module, args_schema=(BatchTensorDescriptor(2),), max_batch_size=8)
        runtime = Runtime({"expert.0": backend})
        runtimes.append(runtime)
        runtime.start()
        assert runtime.ready.wait(10)
        return backend

    yield serve
    for runtime in runtimes:
        runtime.shutdown(timeout=10)


def test_output_of_another_per_example_shape_fails_with_the_shapes():
    backend = ModuleBackend(
        "expert.0", WidensOnLargeInputs(), args_schema=(BatchTensorDescriptor(2),), max_batch_size=8
    )
    with pytest.raises(RuntimeError, match=r"output #0 of the module has shape \[1, 3\].*promises \[1, 2\]"):
        backend.forward(torch.full((1, 2), 1000.0))


def test_output_of_another_dtype_fails_with_the_dtypes():
    backend = ModuleBackend(
        "expert.0", DoublesOnLargeInputs(), args_schema=(BatchTensorDescriptor(2),), max_batch_size=8
    )
    with pytest.raises(RuntimeError, match=r"dtype torch.float64, but outputs_schema promises torch.float32"):
        backend.forward(torch.full((1, 2), 1000.0))


def test_only_the_task_that_breaks_the_schema_fails_and_the_expert_keeps_serving(served):
    backend = served(WidensOnLargeInputs())
    pool = backend.forward_pool
    bad = pool.submit_task(torch.full((1, 2), 1000.0))
    good = pool.submit_task(torch.ones(2, 2))
    with pytest.raises(RuntimeError, match="outputs_schema promises"):
        bad.result(timeout=10)
    (output,) = good.result(timeout=10)
    assert torch.equal(output, torch.full((2, 2), 2.0))
    (output,) = pool.submit_task(torch.ones(1, 2)).result(timeout=10)
    assert output.shape == (1, 2)
