"""Periodic checkpoints do not fill the disk: only the newest saves of each expert are kept."""

from pathlib import Path

import torch
from torch import nn

from hivemind.moe.server.checkpoints import KEEP_CHECKPOINTS, LAST_CHECKPOINT_NAME, load_experts, store_experts
from hivemind.moe.server.module_backend import ModuleBackend
from hivemind.utils.tensor_descr import BatchTensorDescriptor


def make_backend() -> ModuleBackend:
    module = nn.Linear(4, 4)
    return ModuleBackend("expert.0", module, args_schema=(BatchTensorDescriptor(4),), max_batch_size=8)


def test_only_the_newest_saves_are_kept_and_the_last_one_loads(tmp_path: Path):
    backend = make_backend()
    (tmp_path / "expert.0").mkdir()
    (tmp_path / "expert.0" / "checkpoint_best.pt").write_bytes(b"a file of the user's")
    for _ in range(KEEP_CHECKPOINTS + 4):
        with torch.no_grad():
            backend.module.weight.add_(1)
        store_experts({"expert.0": backend}, tmp_path)
    names = sorted(path.name for path in (tmp_path / "expert.0").iterdir())
    saves = [name for name in names if name not in (LAST_CHECKPOINT_NAME, "checkpoint_best.pt")]
    assert len(saves) == KEEP_CHECKPOINTS
    assert "checkpoint_best.pt" in names and LAST_CHECKPOINT_NAME in names
    fresh = make_backend()
    load_experts({"expert.0": fresh}, tmp_path)
    assert torch.equal(fresh.module.weight, backend.module.weight)


def test_keep_none_keeps_every_save(tmp_path: Path):
    backend = make_backend()
    for _ in range(KEEP_CHECKPOINTS + 2):
        store_experts({"expert.0": backend}, tmp_path, keep=None)
    assert len(list((tmp_path / "expert.0").iterdir())) == KEEP_CHECKPOINTS + 2 + 1  # and the link
