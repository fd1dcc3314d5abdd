"""The built-in experts (hivemind-server --expert_cls) have the original's parameters and compute its outputs.

So a checkpoint_dir of either implementation loads in the other, and a restarted server answers as before.
"""

from pathlib import Path

import pytest
import torch

from hivemind.moe.server.layers import name_to_block

from .harness import run_original_script

pytestmark = [pytest.mark.interop, pytest.mark.timeout(120)]

HIDDEN = 64
EXPERTS = ["ffn", "transformer", "det_dropout", "nop", "nop_delay"]


def run_original(script: str, directory: Path) -> str:
    return run_original_script(script, directory, timeout=90)


def sample_inputs(expert_cls: str):
    generator = torch.Generator().manual_seed(1)
    if expert_cls == "transformer":
        mask = torch.zeros(2, 7, dtype=torch.bool)
        mask[0, 5:] = True
        return torch.randn(2, 7, HIDDEN, generator=generator), mask
    if expert_cls == "det_dropout":
        return torch.randn(3, HIDDEN, generator=generator), torch.randint(0, 2, (3, HIDDEN), generator=generator)
    return (torch.randn(3, HIDDEN, generator=generator),)


def test_experts_of_the_original_load_in_ours_and_compute_the_same_outputs(original_env, tmp_path):
    inputs = {expert_cls: sample_inputs(expert_cls) for expert_cls in EXPERTS}
    torch.save(inputs, tmp_path / "inputs.pt")
    run_original(
        f"""
        import sys, torch
        from hivemind.moe.server.layers import name_to_block
        inputs = torch.load(sys.argv[1] + "/inputs.pt")
        saved = {{}}
        for expert_cls in {EXPERTS!r}:
            torch.manual_seed(0)
            expert = name_to_block[expert_cls]({HIDDEN})
            if expert_cls == "nop_delay":
                expert.delay = 0
            outputs = {{}}
            for training in (False, True):
                expert.train(training)
                outputs[training] = expert(*inputs[expert_cls]).detach()
            saved[expert_cls] = (expert.state_dict(), outputs)
        torch.save(saved, sys.argv[1] + "/original.pt")
        """,
        tmp_path,
    )
    saved = torch.load(tmp_path / "original.pt")
    for expert_cls in EXPERTS:
        state_dict, outputs = saved[expert_cls]
        expert = name_to_block[expert_cls](HIDDEN)
        expert.load_state_dict(state_dict)  # strict: the same parameter names and shapes
        if expert_cls == "nop_delay":
            expert.delay = 0
        trainings = (False, True) if expert_cls != "transformer" else (False,)  # (its dropout draws at random)
        for training in trainings:
            expert.train(training)
            output = expert(*inputs[expert_cls])
            assert torch.allclose(output, outputs[training], atol=1e-5), (expert_cls, training)

    ours = {}
    for expert_cls in EXPERTS:
        torch.manual_seed(3)
        ours[expert_cls] = name_to_block[expert_cls](HIDDEN).state_dict()
    torch.save(ours, tmp_path / "ours.pt")
    out = run_original(
        f"""
        import sys, torch
        from hivemind.moe.server.layers import name_to_block
        for expert_cls, state_dict in torch.load(sys.argv[1] + "/ours.pt").items():
            name_to_block[expert_cls]({HIDDEN}).load_state_dict(state_dict)
            print(expert_cls)
        """,
        tmp_path,
    )
    assert out.split() == EXPERTS


def test_checkpoints_of_our_earlier_experts_still_load():
    # before they matched the original, the transformer wrapped its layer as .layer and the nop experts had .dummy
    torch.manual_seed(0)
    transformer = name_to_block["transformer"](HIDDEN)
    earlier = {f"layer.{key}": value for key, value in transformer.state_dict().items()}
    torch.manual_seed(1)
    restored = name_to_block["transformer"](HIDDEN)
    restored.load_state_dict(earlier)
    assert all(torch.equal(a, b) for a, b in zip(restored.state_dict().values(), transformer.state_dict().values()))
    for expert_cls in "nop", "nop_delay":
        name_to_block[expert_cls](HIDDEN).load_state_dict({"dummy": torch.zeros(0)})
