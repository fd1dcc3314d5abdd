"""Checkpoints of hosted experts: layout, round trip, atomic writes, periodic saver."""

import os
import threading
from pathlib import Path

import pytest
import torch
from torch import nn

from hivemind.moe.server import checkpoints
from hivemind.moe.server.checkpoints import CheckpointSaver, is_directory, load_experts, store_experts
from hivemind.moe.server.module_backend import ModuleBackend
from hivemind.utils.tensor_descr import BatchTensorDescriptor


def make_backend(uid: str, seed: int) -> ModuleBackend:
    torch.manual_seed(seed)
    module = nn.Linear(4, 4)
    optimizer = torch.optim.Adam(module.parameters(), lr=0.01)
    return ModuleBackend(uid, module, optimizer=optimizer, args_schema=(BatchTensorDescriptor(4),), max_batch_size=8)


def test_round_trip_restores_module_and_optimizer(tmp_path: Path):
    experts = {"expert.0": make_backend("expert.0", 0), "expert.1": make_backend("expert.1", 1)}
    for backend in experts.values():
        backend.backward(torch.randn(3, 4), torch.randn(3, 4))  # some optimizer state to save
    saved = {uid: backend.state_dict() for uid, backend in experts.items()}
    store_experts(experts, tmp_path)

    fresh = {"expert.0": make_backend("expert.0", 5), "expert.1": make_backend("expert.1", 6)}
    load_experts(fresh, tmp_path)
    for uid, backend in fresh.items():
        assert torch.equal(backend.module.weight, saved[uid]["module"]["weight"])
        state = backend.optimizer.state_dict()["state"][0]
        assert torch.equal(state["exp_avg"], saved[uid]["optimizer"]["state"][0]["exp_avg"])


def test_layout_and_last_symlink_points_at_the_newest(tmp_path: Path):
    experts = {"expert.0": make_backend("expert.0", 0)}
    store_experts(experts, tmp_path)
    experts["expert.0"].backward(torch.randn(3, 4), torch.randn(3, 4))
    store_experts(experts, tmp_path)
    files = sorted(path.name for path in (tmp_path / "expert.0").iterdir())
    assert len(files) == 3 and files[-1] == "checkpoint_last.pt"
    assert all(name.startswith("checkpoint_") and name.endswith(".pt") for name in files)
    last = tmp_path / "expert.0" / "checkpoint_last.pt"
    assert last.is_symlink() and os.readlink(last) == files[1]  # relative link to the newer of the two
    assert torch.equal(torch.load(last)["module"]["weight"], experts["expert.0"].module.weight)


def test_failed_write_leaves_the_previous_checkpoint(tmp_path: Path, monkeypatch):
    experts = {"expert.0": make_backend("expert.0", 0)}
    store_experts(experts, tmp_path)
    before = torch.load(tmp_path / "expert.0" / "checkpoint_last.pt")

    def crash(*args, **kwargs):
        raise OSError("disk full")

    experts["expert.0"].backward(torch.randn(3, 4), torch.randn(3, 4))
    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        store_experts(experts, tmp_path)
    monkeypatch.undo()
    names = sorted(path.name for path in (tmp_path / "expert.0").iterdir())
    assert len(names) == 2  # no temporary or partial file left behind
    after = torch.load(tmp_path / "expert.0" / "checkpoint_last.pt")
    assert torch.equal(after["module"]["weight"], before["module"]["weight"])


def test_expert_without_checkpoint_keeps_its_state(tmp_path: Path):
    backend = make_backend("expert.3", 0)
    weight = backend.module.weight.detach().clone()
    load_experts({"expert.3": backend}, tmp_path)
    assert torch.equal(backend.module.weight, weight)


def test_uid_that_is_not_a_directory_name_is_refused(tmp_path: Path):
    with pytest.raises(ValueError, match="cannot be used"):
        store_experts({"../escape": make_backend("x.0", 0)}, tmp_path)


def test_is_directory(tmp_path: Path):
    (tmp_path / "file").write_text("")
    assert is_directory(tmp_path) and is_directory(str(tmp_path))
    assert not is_directory(tmp_path / "missing")
    assert not is_directory(tmp_path / "file")
    assert not is_directory(None)


def test_loading_from_a_missing_directory_is_a_clear_error(tmp_path: Path):
    missing = tmp_path / "missing"
    with pytest.raises(FileNotFoundError, match="does not exist; create it") as error_info:  # (a first run)
        load_experts({"expert.0": make_backend("expert.0", 0)}, missing)
    assert f"mkdir -p {missing}" in str(error_info.value)


def test_checkpoint_saver_saves_periodically_until_shutdown(tmp_path: Path, monkeypatch):
    saves, three_saves = [], threading.Event()

    def counting_store(experts, checkpoint_dir):
        store_experts(experts, checkpoint_dir)
        saves.append(checkpoint_dir)
        if len(saves) >= 3:
            three_saves.set()

    monkeypatch.setattr(checkpoints, "store_experts", counting_store)
    saver = CheckpointSaver({"expert.0": make_backend("expert.0", 0)}, tmp_path, update_period=0.05)
    saver.start()
    assert three_saves.wait(10)
    saver.shutdown(timeout=10)
    assert not saver.is_alive()
    count = len(saves)
    assert (tmp_path / "expert.0" / "checkpoint_last.pt").is_symlink()
    assert len(list((tmp_path / "expert.0").iterdir())) >= 3
    assert len(saves) == count  # no save after shutdown
