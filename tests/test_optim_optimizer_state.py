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
    assert len(opt.state) == 4 and all(float(state["step"]) == 0 for state in opt.state.values())


def test_initialized_adam_trains_exactly_like_a_fresh_one():
    model, opt = make_adam()
    reference, reference_opt = make_adam()
    initialize_optimizer_state_(opt)
    torch.manual_seed(1)
    train_steps(model, opt)
    torch.manual_seed(1)
    train_steps(reference, reference_opt)
    assert all(torch.allclose(a, b) for a, b in zip(model.parameters(), reference.parameters()))


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
