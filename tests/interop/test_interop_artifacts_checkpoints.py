"""Expert checkpoint directories written by one implementation load in the other (an upgrade, or going back).

The original keeps ``<uid>/checkpoint_<local time>.pt`` files and a copy of the newest as ``checkpoint_last.pt``;
ours writes the same file format, with ``checkpoint_last.pt`` a link to the newest.
"""

import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
from torch import nn

from hivemind.moe.server.checkpoints import load_experts, store_experts
from hivemind.moe.server.module_backend import ModuleBackend
from hivemind.utils.tensor_descr import BatchTensorDescriptor

from .harness import run_original_script

pytestmark = [pytest.mark.interop, pytest.mark.timeout(90)]

# the same experts on both sides: a Linear layer with Adam, one optimizer step taken before saving
EXPERTS_SCRIPT = """
import sys, torch
from pathlib import Path
from torch import nn
from hivemind.moe.server.checkpoints import load_experts, store_experts
from hivemind.moe.server.module_backend import ModuleBackend
from hivemind.utils.tensor_descr import BatchTensorDescriptor

def make_backend(uid, seed):
    torch.manual_seed(seed)
    module = nn.Linear(4, 4)
    optimizer = torch.optim.Adam(module.parameters(), lr=0.01)
    return ModuleBackend(uid, module, optimizer=optimizer, args_schema=(BatchTensorDescriptor(4),), max_batch_size=8)
"""


def make_backend(uid: str, seed: int) -> ModuleBackend:
    torch.manual_seed(seed)
    module = nn.Linear(4, 4)
    optimizer = torch.optim.Adam(module.parameters(), lr=0.01)
    return ModuleBackend(uid, module, optimizer=optimizer, args_schema=(BatchTensorDescriptor(4),), max_batch_size=8)


def run_original(script: str, directory: Path) -> str:
    return run_original_script(script, directory, prelude=EXPERTS_SCRIPT)


def write_with_the_original(checkpoint_dir: Path, saves: int = 2) -> None:
    run_original(
        f"""
        experts = {{"expert.0": make_backend("expert.0", 0), "expert.1": make_backend("expert.1", 1)}}
        for _ in range({saves}):
            for backend in experts.values():
                backend.module(torch.randn(3, 4)).sum().backward()
                backend.optimizer.step()
            store_experts(experts, Path(sys.argv[1]))
        for uid, backend in experts.items():
            torch.save(backend.state_dict(), Path(sys.argv[1]) / f"expected-{{uid}}.pt")
        """,
        checkpoint_dir,
    )


def assert_loaded(backend: ModuleBackend, expected: dict) -> None:
    assert torch.equal(backend.module.weight, expected["module"]["weight"])
    state = backend.optimizer.state_dict()["state"][0]
    assert torch.equal(state["exp_avg"], expected["optimizer"]["state"][0]["exp_avg"])


def test_checkpoints_written_by_the_original_load_in_ours(original_env, tmp_path):
    write_with_the_original(tmp_path)
    fresh = {"expert.0": make_backend("expert.0", 5), "expert.1": make_backend("expert.1", 6)}
    load_experts(fresh, tmp_path)
    for uid, backend in fresh.items():
        assert_loaded(backend, torch.load(tmp_path / f"expected-{uid}.pt"))
    store_experts(fresh, tmp_path)  # our save next to the original's files; the newest is ours, and loads
    again = {"expert.0": make_backend("expert.0", 7)}
    load_experts(again, tmp_path)
    assert_loaded(again["expert.0"], torch.load(tmp_path / "expected-expert.0.pt"))


def test_checkpoints_written_by_ours_load_in_the_original_with_the_same_permissions(original_env, tmp_path):
    ours_dir, original_dir = tmp_path / "ours", tmp_path / "original"
    ours_dir.mkdir(), original_dir.mkdir()
    experts = {"expert.0": make_backend("expert.0", 0)}
    experts["expert.0"].backward(torch.randn(3, 4), torch.randn(3, 4))
    store_experts(experts, ours_dir)
    torch.save(experts["expert.0"].state_dict(), tmp_path / "expected.pt")
    out = run_original(
        """
        fresh = {"expert.0": make_backend("expert.0", 5)}
        load_experts(fresh, Path(sys.argv[1]) / "ours")
        expected = torch.load(Path(sys.argv[1]) / "expected.pt")
        assert torch.equal(fresh["expert.0"].module.weight, expected["module"]["weight"])
        store_experts(fresh, Path(sys.argv[1]) / "original")
        print("loaded")
        """,
        tmp_path,
    )
    assert out.strip() == "loaded"
    # other users' tools (a backup job, a reader in another container) can read our files as well as the original's
    (ours_file,) = [path for path in (ours_dir / "expert.0").iterdir() if not path.is_symlink()]
    original_file = original_dir / "expert.0" / "checkpoint_last.pt"
    assert stat.S_IMODE(ours_file.stat().st_mode) == stat.S_IMODE(original_file.stat().st_mode)


def test_a_damaged_newest_checkpoint_of_the_original_says_how_to_go_back_to_an_earlier_save(original_env, tmp_path):
    write_with_the_original(tmp_path)
    last = tmp_path / "expert.0" / "checkpoint_last.pt"
    os.truncate(last, 100)  # e.g. the disk filled up while the original copied the newest save
    with pytest.raises(RuntimeError, match="could not read the checkpoint") as info:
        load_experts({"expert.0": make_backend("expert.0", 5)}, tmp_path)
    advice = [part for part in str(info.value).split("(") if part.startswith("cp ")]
    assert len(advice) == 1, f"the error does not say how to restore an earlier save: {info.value}"
    advice = advice[0]
    _, earlier, target = advice.split(")")[0].split()
    assert Path(target) == last and Path(earlier).parent == last.parent and Path(earlier).name != last.name
    shutil.copyfile(earlier, target)  # the advice followed: the newest earlier save loads
    fresh = {"expert.0": make_backend("expert.0", 5)}
    load_experts(fresh, tmp_path)
    assert_loaded(fresh["expert.0"], torch.load(tmp_path / "expected-expert.0.pt"))
