"""Built-in experts pickle whole (torch.save(module), processes started with spawn), as they did before they took
hivemind 1.1.12's parameter names, and keep reading the checkpoints of our earlier versions after unpickling."""

import io

import pytest
import torch

from hivemind.moe.server.layers import name_to_block, name_to_input


def _round_trip(module: torch.nn.Module) -> torch.nn.Module:
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", ["ffn", "transformer", "nop", "nop_delay", "det_dropout"])
def test_builtin_experts_pickle_whole_and_compute_the_same_outputs(name):
    torch.manual_seed(0)
    expert = name_to_block[name](16).eval()
    if name == "nop_delay":
        expert.delay = 0.0
    loaded = _round_trip(expert)
    assert type(loaded) is type(expert)
    sample = name_to_input[name](2, 16)
    sample = sample if isinstance(sample, tuple) else (sample,)
    sample = tuple(torch.randn_like(x) if x.is_floating_point() else x for x in sample)
    with torch.no_grad():
        assert torch.equal(loaded(*sample), expert(*sample))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name, old_prefix, new_prefix", [("transformer", "layer.", ""), ("nop", "dummy", "w")])
def test_unpickled_experts_still_load_checkpoints_of_our_earlier_versions(name, old_prefix, new_prefix):
    loaded = _round_trip(name_to_block[name](16))
    current = {key: value + 1 for key, value in loaded.state_dict().items()}
    earlier = {old_prefix + key[len(new_prefix) :]: value for key, value in current.items()}
    loaded.load_state_dict(earlier)  # renamed on load by the hook, which came through the pickle
    assert all(torch.equal(loaded.state_dict()[key], value) for key, value in current.items())
