"""det_dropout: an expert whose dropout mask is an input, so that a forward pass can be repeated exactly."""

from __future__ import annotations

import torch
from torch import nn

from hivemind.moe.server.layers.custom_experts import register_expert_class

__all__ = ["DeterministicDropout", "DeterministicDropoutNetwork"]


class DeterministicDropout(nn.Module):
    """Dropout with a given mask: in training, ``x * mask / keep_probability``; in eval mode, ``x`` unchanged.

    :param drop_prob: the probability with which the caller drew zeros in the mask
    """

    def __init__(self, drop_prob: float):
        super().__init__()
        if not 0 <= drop_prob < 1:
            raise ValueError(f"drop_prob must be in [0, 1), got {drop_prob}")
        self.keep_prob = 1 - drop_prob

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        return x * mask.to(x.dtype) / self.keep_prob


def _sample_input(batch_size: int, hidden_dim: int):
    return torch.empty((batch_size, hidden_dim)), torch.randint(0, 2, (batch_size, hidden_dim))


@register_expert_class("det_dropout", _sample_input)
class DeterministicDropoutNetwork(nn.Module):
    """DeterministicDropout(mask) -> Linear (2x wide) -> ReLU -> Linear; inputs ``x`` and an integer 0/1 ``mask`` of
    the same shape. The same parameters and outputs as hivemind 1.1.12's ``det_dropout`` expert."""

    def __init__(self, hidden_dim: int, dropout_prob: float = 0.2):
        super().__init__()
        self.linear_in = nn.Linear(hidden_dim, 2 * hidden_dim)
        self.activation = nn.ReLU()
        self.dropout = DeterministicDropout(dropout_prob)
        self.linear_out = nn.Linear(2 * hidden_dim, hidden_dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.linear_out(self.activation(self.linear_in(self.dropout(x, mask))))
