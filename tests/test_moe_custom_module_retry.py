"""A custom expert file that fails half-way registers nothing, so that the fixed file loads in the same process."""

import pytest

from hivemind.moe.server.layers import add_custom_models_from_file, name_to_block, name_to_input

HEADER = """
import torch
from hivemind.moe.server.layers.custom_experts import register_expert_class

@register_expert_class("half_loaded_expert", lambda batch_size, hidden_dim: torch.empty((batch_size, hidden_dim)))
class Expert(torch.nn.Module):
    def __init__(self, hidden_dim):
        super().__init__()
        self.linear = torch.nn.Linear(hidden_dim, hidden_dim)

    def forward(self, x):
        return self.linear(x)
"""


def test_failed_custom_file_leaves_no_registration_and_loads_once_fixed(tmp_path):
    path = tmp_path / "experts.py"
    path.write_text(HEADER + "\nraise ValueError('a typo further down')\n")
    try:
        with pytest.raises(ValueError, match="a typo further down"):
            add_custom_models_from_file(path)
        assert "half_loaded_expert" not in name_to_block and "half_loaded_expert" not in name_to_input
        path.write_text(HEADER)
        add_custom_models_from_file(path)
        assert name_to_block["half_loaded_expert"].__name__ == "Expert"
    finally:
        name_to_block.pop("half_loaded_expert", None)
        name_to_input.pop("half_loaded_expert", None)
