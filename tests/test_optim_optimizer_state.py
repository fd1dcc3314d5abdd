"""Optimizer state as (metadata, tensors): initialization, dump, and a checked load of a peer's state."""

import pytest
import torch

from hivemind.optim.optimizer_state import (
    OptimizerStateError,
    dump_optimizer_state,
    initialize_optimizer_state_,
    load_optimizer_state,
)
from hivemind.utils.serializer import MSGPackSerializer


def make_adam(seed=0, lr=0.01):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 1))
    return model, torch.optim.Adam(model.parameters(), lr=lr)


def train_steps(model, opt, steps=3):
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(5, 3)).pow(2).mean().backward()
        opt.step()


def test_initialization_creates_state_but_changes_nothing_else():
    model, opt = make_adam()
    before = [param.detach().clone() for param in model.parameters()]
    initialize_optimizer_state_(opt)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(param.grad is None for param in model.parameters())
    assert opt.param_groups[0]["lr"] == 0.01
    # the zero-gradient step counts, as in 1.1.12 (whose peers share the swarm with ours): Adam's step is 1
    assert len(opt.state) == 4 and all(float(state["step"]) == 1 for state in opt.state.values())


def test_initialized_adam_trains_like_one_that_took_a_zero_gradient_step_as_the_original_does():
    """Peers of 1.1.12 and ours apply the same averaged gradients: their Adam steps must be the same size (a step
    counter reset to 0 made ours 1/0.744 times larger than the original's in the first epoch, then drift apart)."""
    model, opt = make_adam()
    reference, reference_opt = make_adam()
    initialize_optimizer_state_(opt)
    for param in reference.parameters():  # what 1.1.12 does to initialize: a step with zero gradients
        param.grad = torch.zeros_like(param)
    reference_opt.step()
    torch.manual_seed(1)
    train_steps(model, opt)
    torch.manual_seed(1)
    train_steps(reference, reference_opt)
    assert all(torch.allclose(a, b) for a, b in zip(model.parameters(), reference.parameters()))


def test_first_adam_step_after_initialization_has_the_original_size():
    """One Adam step of lr=0.01 after initialization moves every parameter by lr * 0.7443 (bias correction of step
    2 with one step's moments), as a 1.1.12 peer's does; a fresh Adam's first step moves it by exactly lr."""
    param = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    opt = torch.optim.Adam([param], lr=0.01)
    initialize_optimizer_state_(opt)
    param.grad = torch.tensor([0.5, -4.0, 1e-3])
    opt.step()
    expected = 0.01 * (0.1 / (1 - 0.9**2)) / ((0.001 / (1 - 0.999**2)) ** 0.5)
    torch.testing.assert_close(param.detach(), torch.tensor([1.0 - expected, -2.0 + expected, 3.0 - expected]))


def test_dump_and_load_round_trip_through_msgpack():
    source_model, source = make_adam(seed=0, lr=0.05)
    train_steps(source_model, source)
    target_model, target = make_adam(seed=1)
    initialize_optimizer_state_(target)

    metadata, tensors = dump_optimizer_state(source)
    metadata = MSGPackSerializer.loads(MSGPackSerializer.dumps(metadata))
    load_optimizer_state(target, metadata, [tensor.clone() for tensor in tensors])

    assert target.param_groups[0]["lr"] == 0.05
    for key in ("exp_avg", "exp_avg_sq", "step"):
        assert torch.equal(
            target.state[target.param_groups[0]["params"][0]][key], source.state[source_model[0].weight][key]
        )
    assert target.param_groups[0]["params"][0] is target_model[0].weight


def test_metadata_entries_are_in_the_documented_format():
    _, opt = make_adam()
    initialize_optimizer_state_(opt)
    metadata, tensors = dump_optimizer_state(opt)
    assert {entry["type"] for entry in metadata} == {"tensor", "value"}
    assert [entry["index"] for entry in metadata if entry["type"] == "tensor"] == list(range(len(tensors)))


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda metadata, tensors: (metadata[:-1], tensors),
        lambda metadata, tensors: ([{"type": "tensor", "index": 10**6}] + metadata[1:], tensors),
        lambda metadata, tensors: ([{"type": "pickle"}] + metadata[1:], tensors),
        lambda metadata, tensors: (metadata, [torch.zeros(7, 7)] + tensors[1:]),
        lambda metadata, tensors: ("garbage", tensors),
        lambda metadata, tensors: [{"type": "value", "value": 1.0} if m["type"] == "tensor" else m for m in metadata],
    ],
    ids=["too-short", "missing-tensor", "unknown-type", "wrong-shape", "not-a-list", "value-for-tensor"],
)
def test_mismatching_state_is_refused_and_leaves_the_optimizer_unchanged(corrupt):
    source_model, source = make_adam()
    train_steps(source_model, source)
    _, target = make_adam(seed=1)
    initialize_optimizer_state_(target)
    before = dump_optimizer_state(target)[1]
    before = [tensor.clone() for tensor in before]
    metadata, tensors = dump_optimizer_state(source)
    corrupted = corrupt(list(metadata), list(tensors))
    if not isinstance(corrupted, tuple):
        corrupted = (corrupted, tensors)
    with pytest.raises(OptimizerStateError):
        load_optimizer_state(target, *corrupted)
    assert all(torch.equal(a, b) for a, b in zip(before, dump_optimizer_state(target)[1]))
