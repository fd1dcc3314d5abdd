"""The expert registry: built-in experts, custom classes from a file, optimizer wrapper and schedules."""

import pickle
import textwrap

import pytest
import torch

from hivemind.moe.server.layers import (
    ClippingWrapper,
    add_custom_models_from_file,
    name_to_block,
    name_to_input,
    register_expert_class,
    schedule_name_to_scheduler,
)
from hivemind.moe.server.layers.dropout import DeterministicDropout
from hivemind.moe.server.layers.lr_schedule import LinearWarmupDecay


@pytest.mark.parametrize("name", ["ffn", "transformer", "nop", "nop_delay", "det_dropout"])
def test_builtin_expert_runs_on_its_sample_input(name):
    expert = name_to_block[name](32)
    if name == "nop_delay":
        expert.delay = 0.0
    sample = name_to_input[name](3, 32)
    sample = sample if isinstance(sample, tuple) else (sample,)
    sample = tuple(torch.randn_like(x) if x.is_floating_point() else x for x in sample)
    output = expert(*sample)
    assert output.shape == sample[0].shape and torch.isfinite(output).all()
    assert list(expert.parameters()), "optimizers need at least one parameter"


def test_sample_inputs_have_the_documented_shapes():
    x, mask = name_to_input["transformer"](2, 64)
    assert x.shape == (2, 128, 64) and mask.shape == (2, 128) and mask.dtype == torch.bool
    x, mask = name_to_input["det_dropout"](2, 64)
    assert x.shape == mask.shape == (2, 64) and not mask.is_floating_point()


def test_nop_returns_a_copy():
    x = torch.randn(2, 8)
    output = name_to_block["nop"](8)(x)
    assert torch.equal(output, x) and output.data_ptr() != x.data_ptr()


def test_deterministic_dropout_applies_the_given_mask_in_training_only():
    dropout = DeterministicDropout(0.5)
    x, mask = torch.ones(2, 4), torch.tensor([[1, 0, 1, 0], [0, 0, 1, 1]])
    assert torch.equal(dropout(x, mask), mask * 2.0)
    dropout.eval()
    assert torch.equal(dropout(x, mask), x)


def test_registering_a_name_twice_is_an_error():
    @register_expert_class("test_layers_unique_expert", lambda batch_size, hidden_dim: torch.empty(batch_size, 1))
    class First(torch.nn.Module):
        pass

    assert name_to_block["test_layers_unique_expert"] is First
    with pytest.raises(RuntimeError, match="already registered"):

        @register_expert_class("test_layers_unique_expert", lambda batch_size, hidden_dim: None)
        class Second(torch.nn.Module):
            pass

    assert name_to_block["test_layers_unique_expert"] is First


def test_custom_experts_from_a_file(tmp_path):
    path = tmp_path / "my_experts.py"
    path.write_text(
        textwrap.dedent(
            """
            import torch
            from hivemind.moe.server.layers.custom_experts import register_expert_class

            @register_expert_class("test_layers_custom_square", lambda batch, hidden: torch.empty(batch, hidden))
            class Square(torch.nn.Module):
                def __init__(self, hidden_dim):
                    super().__init__()
                    self.scale = torch.nn.Parameter(torch.ones(hidden_dim))

                def forward(self, x):
                    return x * x * self.scale
            """
        )
    )
    add_custom_models_from_file(path)
    add_custom_models_from_file(str(path))  # a second load of the same file does nothing
    expert = name_to_block["test_layers_custom_square"](3)
    assert torch.equal(expert(torch.full((2, 3), 2.0)), torch.full((2, 3), 4.0))
    with pytest.raises(FileNotFoundError):
        add_custom_models_from_file(tmp_path / "missing.py")


def test_clipping_wrapper_clips_the_total_gradient_norm():
    layer = torch.nn.Linear(4, 4)
    optimizer = ClippingWrapper(torch.optim.SGD(layer.parameters(), lr=1.0), clip_grad_norm=0.5)
    before = [param.detach().clone() for param in layer.parameters()]
    (layer(torch.randn(8, 4)).sum() * 1000).backward()
    optimizer.step()
    change = torch.cat([(param - old).flatten() for param, old in zip(layer.parameters(), before)])
    assert change.norm().item() == pytest.approx(0.5, rel=1e-4)  # lr 1 times a gradient clipped to norm 0.5
    optimizer.zero_grad()
    assert all(param.grad is None for param in layer.parameters())


def test_linear_schedule_warms_up_then_decays_and_pickles():
    layer = torch.nn.Linear(2, 2)
    optimizer = ClippingWrapper(torch.optim.SGD(layer.parameters(), lr=1.0), clip_grad_norm=None)
    scheduler = schedule_name_to_scheduler["linear"](optimizer, num_warmup_steps=2, num_training_steps=6)
    learning_rates = []
    for _ in range(8):
        learning_rates.append(round(optimizer.param_groups[0]["lr"], 4))
        optimizer.step()
        scheduler.step()
    assert learning_rates == [0.0, 0.5, 1.0, 0.75, 0.5, 0.25, 0.0, 0.0]
    restored = pickle.loads(pickle.dumps(scheduler))
    assert restored.get_last_lr() == scheduler.get_last_lr()
    assert schedule_name_to_scheduler["none"] is None


def test_linear_schedule_needs_its_step_counts():
    with pytest.raises(ValueError, match="num_warmup_steps and num_training_steps"):
        LinearWarmupDecay(None, 10)
    with pytest.raises(ValueError, match="num_warmup_steps <= num_training_steps"):
        LinearWarmupDecay(10, 5)
