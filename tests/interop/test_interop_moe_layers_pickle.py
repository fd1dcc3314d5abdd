"""Whole built-in experts pickled (torch.save(module)) by one implementation unpickle in the other and keep working.

hivemind 1.1.12's nop experts pickle whole (its transformer does not: its activation is a TorchScript function); ours
must unpickle there, and the original's must unpickle here and still read the checkpoints of our earlier versions,
whose parameter was named ``dummy``.
"""

import pytest
import torch

from hivemind.moe.server.layers import name_to_block

from .test_interop_artifacts_pickles import run_original

pytestmark = [pytest.mark.interop, pytest.mark.timeout(90)]

NAMES = ("nop", "nop_delay")


def test_nop_experts_pickled_by_ours_unpickle_and_work_in_the_original(original_env, tmp_path):
    for name in NAMES:
        torch.save(name_to_block[name](4), tmp_path / f"{name}.pt")
    out = run_original(
        f"""
        import sys, torch
        for name in {NAMES!r}:
            expert = torch.load(sys.argv[1] + f"/{{name}}.pt", weights_only=False)
            expert.delay = 0.0
            expert.load_state_dict({{"w": torch.zeros(0)}})
            x = torch.randn(2, 4)
            assert torch.equal(expert(x), x)
            print(name, type(expert).__module__, list(expert.state_dict()))
        """,
        tmp_path,
    )
    assert out.split("\n")[:2] == [f"{name} hivemind.moe.server.layers.common ['w']" for name in NAMES], out


def test_nop_experts_pickled_by_the_original_read_checkpoints_of_our_earlier_versions(original_env, tmp_path):
    run_original(
        f"""
        import sys, torch
        from hivemind.moe.server.layers import name_to_block
        for name in {NAMES!r}:
            torch.save(name_to_block[name](4), sys.argv[1] + f"/{{name}}.pt")
        """,
        tmp_path,
    )
    for name in NAMES:
        expert = torch.load(tmp_path / f"{name}.pt", weights_only=False)
        assert type(expert) is type(name_to_block[name](4))
        expert.load_state_dict({"dummy": torch.zeros(0)})  # a checkpoint of our earlier version
        assert list(expert.state_dict()) == ["w"]
        expert.delay = 0.0
        x = torch.randn(2, 4)
        assert torch.equal(expert(x), x)
