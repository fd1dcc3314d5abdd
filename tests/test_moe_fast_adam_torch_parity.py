"""FastAdam: where it must behave exactly like the torch.optim.Adam it stands in for."""

import pytest
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

import hivemind.moe.server.fast_adam as fast_adam
from hivemind.moe.server.fast_adam import FastAdam


def _steps(optimizer: torch.optim.Optimizer, params, steps: int = 3) -> None:
    for step in range(steps):
        for param in params:
            param.grad = torch.full_like(param, 0.5 + step)
        optimizer.step()


def _twins(dtype=torch.float32):
    torch.manual_seed(0)
    first = [nn.Parameter(torch.randn(5, 3).to(dtype)), nn.Parameter(torch.randn(4).to(dtype))]
    second = [nn.Parameter(param.detach().clone()) for param in first]
    return first, second


def test_fast_adam_trains_a_param_group_whose_params_are_a_generator():
    module = nn.Linear(4, 4)
    optimizer = FastAdam([{"params": module.parameters(), "lr": 0.1}])
    assert [len(group["params"]) for group in optimizer.param_groups] == [2]
    before = module.weight.detach().clone()
    _steps(optimizer, list(module.parameters()), steps=1)
    assert not torch.equal(module.weight.detach(), before)


def test_fast_adam_accepts_a_tensor_lr_wherever_plain_adam_does():
    ours, theirs = _twins(torch.complex64)  # complex parameters: no fused kernel, the foreach kernels refuse it
    optimizer = FastAdam(ours, lr=torch.tensor(0.01))
    _steps(optimizer, ours)
    _steps(torch.optim.Adam(theirs, lr=torch.tensor(0.01)), theirs)
    for param, reference in zip(ours, theirs):
        assert torch.allclose(param, reference)


def test_fast_adam_added_group_with_a_tensor_lr_still_steps():
    first = nn.Parameter(torch.randn(3))
    optimizer = FastAdam([first], lr=0.01)
    second = nn.Parameter(torch.randn(3, dtype=torch.complex64))
    optimizer.add_param_group({"params": [second], "lr": torch.tensor(0.01)})
    before = second.detach().clone()
    _steps(optimizer, [first, second], steps=1)
    assert not torch.equal(second.detach(), before)


def test_fast_adam_picks_a_kernel_for_named_parameters():
    module = nn.Linear(4, 4)
    optimizer = FastAdam(module.named_parameters())
    assert optimizer.implementation in ("fused", "foreach")
    assert [len(group["params"]) for group in optimizer.param_groups] == [2]


def test_fast_adam_refuses_a_bare_tensor_as_plain_adam_does():
    with pytest.raises(TypeError, match="iterable of Tensors"):
        FastAdam(torch.zeros(3, requires_grad=True))


def test_fast_adam_checkpoint_keeps_an_implementation_the_user_chose():
    ours, theirs = _twins()
    saved = FastAdam(ours, foreach=False).state_dict()
    assert saved["param_groups"] == torch.optim.Adam(theirs, foreach=False).state_dict()["param_groups"]


def test_fast_adam_probe_is_invisible_to_global_optimizer_hooks(monkeypatch):
    monkeypatch.setattr(fast_adam, "_probed", {})
    seen = []
    handle = register_optimizer_step_pre_hook(lambda opt, args, kwargs: seen.append(opt))
    try:
        FastAdam(nn.Linear(2, 2).parameters())
    finally:
        handle.remove()
    assert seen == []
