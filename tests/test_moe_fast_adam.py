"""FastAdam: the server's default Adam runs torch's fastest implementation, with plain Adam's results and state."""

import copy
import functools
import pickle

import pytest
import torch
from torch import nn

import hivemind.moe.server.fast_adam as fast_adam
from hivemind.moe.server.fast_adam import FastAdam, choose_adam_implementation
from hivemind.moe.server.server import _make_backends


def _cpu_has_fused_adam() -> bool:
    param = torch.zeros(2, requires_grad=True)
    param.grad = torch.ones(2)
    try:
        torch.optim.Adam([param], fused=True).step()
        return True
    except Exception:
        return False


def _train(module: nn.Module, optimizer: torch.optim.Optimizer, steps: int = 5, dtype=torch.float32) -> None:
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.randn(8, 16, generator=generator).to(dtype)
        module(x).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()


def _server_backends(modules, optim_cls):
    """The server's backends for ``modules`` (expert.0, expert.1, ...), built as the server builds them."""
    return _make_backends(
        [f"expert.{index}" for index in range(len(modules))], modules, expert_cls="ffn", hidden_dim=16,
        optim_cls=optim_cls, scheduler="none", num_warmup_steps=None, num_training_steps=None, clip_grad_norm=None,
        min_batch_size=1, max_batch_size=8, compression=0,
    )  # fmt: skip


def test_server_builds_its_default_adam_with_the_fastest_implementation():
    modules = [nn.Linear(16, 16) for _ in range(2)]
    backends = _server_backends(modules, torch.optim.Adam)
    for backend in backends.values():
        assert isinstance(backend.optimizer, FastAdam)
        expected = "fused" if _cpu_has_fused_adam() else "foreach"
        assert backend.optimizer.implementation == expected
        assert backend.optimizer.param_groups[0]["fused" if expected == "fused" else "foreach"] is True


def test_server_leaves_a_user_optimizer_factory_alone():
    factory = functools.partial(torch.optim.Adam, lr=0.01)
    backends = _server_backends([nn.Linear(16, 16)], factory)
    optimizer = backends["expert.0"].optimizer
    assert type(optimizer) is torch.optim.Adam
    assert optimizer.param_groups[0]["fused"] is None and optimizer.param_groups[0]["foreach"] is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fast_adam_gives_the_parameters_of_plain_adam(dtype):
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16)).to(dtype)
    reference, initial = copy.deepcopy(module), copy.deepcopy(module)
    _train(module, FastAdam(module.parameters(), lr=0.01), dtype=dtype)
    _train(reference, torch.optim.Adam(reference.parameters(), lr=0.01), dtype=dtype)
    for param, reference_param, initial_param in zip(*(m.parameters() for m in (module, reference, initial))):
        assert not torch.allclose(param, initial_param)  # trained
        assert torch.allclose(param, reference_param, rtol=1e-5, atol=1e-6)


def test_fast_adam_checkpoint_is_a_plain_adam_checkpoint_both_ways():
    module, reference = nn.Linear(16, 16), nn.Linear(16, 16)
    reference.load_state_dict(module.state_dict())
    optimizer, plain = FastAdam(module.parameters()), torch.optim.Adam(reference.parameters())
    _train(module, optimizer, steps=2)
    _train(reference, plain, steps=2)
    saved, plain_saved = optimizer.state_dict(), plain.state_dict()
    assert saved["param_groups"] == plain_saved["param_groups"]  # no implementation recorded

    implementation = optimizer.implementation
    optimizer.load_state_dict(plain_saved)  # a plain Adam's checkpoint keeps the chosen implementation
    assert optimizer.implementation == implementation
    assert optimizer.param_groups[0]["fused" if implementation == "fused" else "foreach"] is True
    _train(module, optimizer, steps=1)
    assert optimizer.state_dict()["state"][0]["step"] == 3

    plain.load_state_dict(saved)  # and a plain Adam loads ours as its own
    assert plain.param_groups[0]["fused"] is None and plain.param_groups[0]["foreach"] is None


def test_fast_adam_falls_back_where_torch_refuses_the_fused_kernel(monkeypatch):
    class OldTorchAdam(torch.optim.Adam):  # as torch < 2.4 on CPU: no fused kernel there
        def __init__(self, params, **kwargs):
            if kwargs.get("fused"):
                raise RuntimeError("`fused=True` requires all the params to be CUDA, floating point Tensor")
            super().__init__(params, **kwargs)

    monkeypatch.setattr(fast_adam, "_probed", {})
    monkeypatch.setattr(torch.optim, "Adam", OldTorchAdam)
    module = nn.Linear(16, 16)
    optimizer = FastAdam(module.parameters())
    assert optimizer.implementation == "foreach" and optimizer.param_groups[0]["fused"] is None
    _train(module, optimizer, steps=2)
    assert optimizer.state_dict()["state"][0]["step"] == 2


def test_fast_adam_uses_the_loop_for_tensor_subclasses_and_foreach_for_complex():
    class Tagged(torch.Tensor):
        pass

    assert choose_adam_implementation([torch.zeros(3).as_subclass(Tagged)]) == "for-loop"
    assert choose_adam_implementation([nn.Parameter(torch.zeros(3, dtype=torch.complex64))]) == "foreach"


def test_fast_adam_respects_an_explicit_implementation_and_pickles():
    optimizer = FastAdam(nn.Linear(4, 4).parameters(), foreach=False)
    assert optimizer.implementation == "for-loop" and optimizer.param_groups[0]["fused"] is None
    copy_ = pickle.loads(pickle.dumps(FastAdam(nn.Linear(4, 4).parameters())))
    assert copy_.implementation in ("fused", "foreach")
    copy_.step()
