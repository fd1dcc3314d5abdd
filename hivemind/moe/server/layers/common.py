"""Built-in experts: ffn, transformer, nop and nop_delay."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from hivemind.moe.server.layers.custom_experts import register_expert_class

__all__ = ["FeedforwardBlock", "TransformerEncoderLayer", "TunedTransformer", "NopExpert", "DelayedNopExpert"]

SEQUENCE_LENGTH = 128  # sample sequence length of the transformer expert


@register_expert_class("ffn", lambda batch_size, hidden_dim: torch.empty((batch_size, hidden_dim)))
class FeedforwardBlock(nn.Module):
    """LayerNorm(x + Linear(GELU(Linear(x)))), with a 4x wider hidden layer and the tanh approximation of GELU."""

    def __init__(self, hidden_dim: int):
        super().__init__()
        self.ffn = nn.Linear(hidden_dim, 4 * hidden_dim)
        self.ffn_output = nn.Linear(4 * hidden_dim, hidden_dim)
        self.layer_norm = nn.LayerNorm(hidden_dim, eps=1e-12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = F.gelu(self.ffn(x), approximate="tanh")
        return self.layer_norm(x + self.ffn_output(hidden))


def _transformer_sample_input(batch_size: int, hidden_dim: int):
    return torch.empty((batch_size, SEQUENCE_LENGTH, hidden_dim)), torch.zeros(
        (batch_size, SEQUENCE_LENGTH), dtype=bool
    )


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def _rename_keys(state_dict, prefix: str, renames: dict) -> None:
    for key in [key for key in state_dict if key.startswith(prefix)]:
        for old, new in renames.items():
            if key[len(prefix) :].startswith(old):
                state_dict[prefix + new + key[len(prefix) + len(old) :]] = state_dict.pop(key)
                break


class _RenamesOnLoad(nn.Module):
    """Renames keys of checkpoints saved by earlier versions of these experts (``_renames_on_load``) as a state_dict
    is loaded. A method of the class, not a hook kept by each expert, so that whole experts pickle (torch.save(module),
    spawn) and their pickles unpickle in hivemind 1.1.12, and experts unpickled from 1.1.12's pickles rename too."""

    _renames_on_load: dict = {}

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        _rename_keys(state_dict, prefix, self._renames_on_load)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


@register_expert_class("transformer", _transformer_sample_input)
class TransformerEncoderLayer(_RenamesOnLoad, nn.TransformerEncoderLayer):
    """A post-norm transformer encoder layer: 16 heads, feed-forward 4x wide, GELU (tanh approximation); the same
    parameters (and state_dict keys) and outputs as hivemind 1.1.12's ``transformer`` expert (TunedTransformer).

    Inputs: ``x`` of shape [batch, length, hidden_dim] and ``src_key_padding_mask`` of shape [batch, length], True
    where a position is padding.
    """

    _renames_on_load = {"layer.": ""}  # wrapped in .layer before

    def __init__(self, hidden_dim: int, num_heads: int = 16, dropout: float = 0.1):
        feedforward_dim = 4 * hidden_dim
        super().__init__(hidden_dim, num_heads, feedforward_dim, dropout, activation=_gelu_tanh, batch_first=True)

    def forward(self, x: torch.Tensor, src_key_padding_mask: torch.Tensor) -> torch.Tensor:
        return super().forward(x, src_key_padding_mask=src_key_padding_mask)


TunedTransformer = TransformerEncoderLayer  # its name in hivemind 1.1.12 (and in pickles of whole experts)


@register_expert_class("nop", lambda batch_size, hidden_dim: torch.empty((batch_size, hidden_dim)))
class NopExpert(_RenamesOnLoad):
    """Returns a copy of its input (for tests and benchmarks of everything around the computation)."""

    _renames_on_load = {"dummy": "w"}  # its parameter's name before

    def __init__(self, hidden_dim: int):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(0))  # so that optimizers accept it (named as in hivemind 1.1.12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clone()


@register_expert_class("nop_delay", lambda batch_size, hidden_dim: torch.empty((batch_size, hidden_dim)))
class DelayedNopExpert(_RenamesOnLoad):
    """Returns a copy of its input after ``delay`` seconds (for tests of timeouts and slow experts)."""

    _renames_on_load = {"dummy": "w"}

    def __init__(self, hidden_dim: int, delay: float = 0.5):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(0))
        self.delay = delay

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.delay)
        return x.clone()
