"""A backward batch whose optimizer step fails leaves no gradients behind for the next batch's step."""

import pytest
import torch
from torch import nn

from hivemind.moe.server.module_backend import ModuleBackend
from hivemind.utils.tensor_descr import BatchTensorDescriptor


class FailsOnce(torch.optim.SGD):
    def __init__(self, params):
        super().__init__(params, lr=1.0)
        self.failures_left = 1

    def step(self, closure=None):
        if self.failures_left:
            self.failures_left -= 1
            raise RuntimeError("optimizer step failed")
        return super().step(closure)


def test_gradients_of_a_batch_whose_step_failed_do_not_reach_the_next_step():
    module = nn.Linear(2, 1, bias=False)
    backend = ModuleBackend(
        "expert.0", module, optimizer=FailsOnce(module.parameters()), args_schema=(BatchTensorDescriptor(2),),
        max_batch_size=4,
    )  # fmt: skip
    with pytest.raises(RuntimeError, match="optimizer step failed"):
        backend.backward(torch.full((1, 2), 100.0), torch.ones(1, 1))  # gradient [100, 100]
    assert module.weight.grad is None or not module.weight.grad.any()
    before = module.weight.detach().clone()
    backend.backward(torch.ones(1, 2), torch.ones(1, 1))  # gradient [1, 1], lr 1
    assert torch.allclose(module.weight, before - 1)
