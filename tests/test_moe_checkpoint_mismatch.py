"""Loading a checkpoint that does not fit the expert fails clearly (naming the file) and changes nothing."""

from pathlib import Path

import pytest
import torch
from torch import nn

from hivemind.moe.server.checkpoints import LAST_CHECKPOINT_NAME, load_experts, store_experts
from hivemind.moe.server.module_backend import ModuleBackend
from hivemind.utils.tensor_descr import BatchTensorDescriptor


def make_backend(module: nn.Module) -> ModuleBackend:
    optimizer = torch.optim.Adam(module.parameters(), lr=0.01)
    return ModuleBackend(
        "expert.0", module, optimizer=optimizer, args_schema=(BatchTensorDescriptor(4),), max_batch_size=8
    )


def snapshot(backend: ModuleBackend) -> dict:
    return {name: tensor.clone() for name, tensor in backend.module.state_dict().items()}


def assert_unchanged(backend: ModuleBackend, before: dict) -> None:
    after = backend.module.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[name], before[name]) for name in before)


def test_checkpoint_of_another_expert_class_names_the_file_and_leaves_the_expert_as_it_was(tmp_path: Path):
    other = make_backend(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4)))
    store_experts({"expert.0": other}, tmp_path)
    backend = make_backend(nn.Sequential(nn.Linear(4, 4)))
    before = snapshot(backend)
    with pytest.raises(RuntimeError, match=r"checkpoint_last\.pt.*does not fit expert expert\.0"):
        load_experts({"expert.0": backend}, tmp_path)
    assert_unchanged(backend, before)  # (the matching first layer was not overwritten)


def test_checkpoint_whose_optimizer_does_not_fit_leaves_the_module_weights_as_they_were(tmp_path: Path):
    saved = make_backend(nn.Linear(4, 4))
    saved.backward(torch.randn(3, 4), torch.randn(3, 4))
    state = saved.state_dict()
    state["optimizer"]["param_groups"][0]["params"] = [0]  # an optimizer over fewer parameters
    (tmp_path / "expert.0").mkdir()
    torch.save(state, tmp_path / "expert.0" / LAST_CHECKPOINT_NAME)
    backend = make_backend(nn.Linear(4, 4))
    before = snapshot(backend)
    with pytest.raises(RuntimeError, match="does not fit expert expert.0"):
        load_experts({"expert.0": backend}, tmp_path)
    assert_unchanged(backend, before)
    assert not backend.optimizer.state_dict()["state"]


def test_file_that_is_not_a_backend_state_dict_is_refused_with_what_it_holds(tmp_path: Path):
    (tmp_path / "expert.0").mkdir()
    torch.save(nn.Linear(4, 4).state_dict(), tmp_path / "expert.0" / LAST_CHECKPOINT_NAME)  # a bare module state
    backend = make_backend(nn.Linear(4, 4))
    before = snapshot(backend)
    with pytest.raises(RuntimeError, match=r"expected a ModuleBackend state dict with a 'module' entry.*'weight'"):
        load_experts({"expert.0": backend}, tmp_path)
    assert_unchanged(backend, before)


def test_truncated_checkpoint_is_a_clear_error(tmp_path: Path):
    store_experts({"expert.0": make_backend(nn.Linear(4, 4))}, tmp_path)
    path = (tmp_path / "expert.0" / LAST_CHECKPOINT_NAME).resolve()
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(RuntimeError, match="could not read the checkpoint"):
        load_experts({"expert.0": make_backend(nn.Linear(4, 4))}, tmp_path)


def test_last_checkpoint_link_to_a_deleted_file_is_an_error_not_a_fresh_start(tmp_path: Path):
    store_experts({"expert.0": make_backend(nn.Linear(4, 4))}, tmp_path)
    (tmp_path / "expert.0" / LAST_CHECKPOINT_NAME).resolve().unlink()  # e.g. pruned by hand
    backend = make_backend(nn.Linear(4, 4))
    with pytest.raises(RuntimeError, match=r"checkpoint_last\.pt' points to 'checkpoint_.*\.pt', which is missing"):
        load_experts({"expert.0": backend}, tmp_path)
