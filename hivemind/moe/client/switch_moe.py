"""RemoteSwitchMixtureOfExperts: Switch-Transformer style routing with a load-balancing loss over the grid."""

from __future__ import annotations

import numbers
import time
from typing import Any, List, Sequence, Tuple

import torch

from hivemind.moe.client.expert import RemoteExpert
from hivemind.moe.client.gating import compute_expert_scores, mix_expert_outputs, uid_coordinates
from hivemind.moe.client.moe import RemoteMixtureOfExperts
from hivemind.utils.nested import nested_pack

__all__ = ["RemoteSwitchMixtureOfExperts", "routed_fractions", "balancing_loss"]


def routed_fractions(
    batch_uids: Sequence[Sequence[str]], uid_prefix: str, grid_size: Sequence[int]
) -> List[torch.Tensor]:
    """Per grid dimension, the fraction of the batch routed to each index (a sample's experts share its unit)."""
    fractions = [torch.zeros(size) for size in grid_size]
    routed_samples = 0
    for uids in batch_uids:
        if not uids:
            continue
        routed_samples += 1
        for uid in uids:
            for dim, coordinate in enumerate(uid_coordinates(uid, uid_prefix, grid_size)):
                fractions[dim][coordinate] += 1.0 / len(uids)
    return [fraction / max(routed_samples, 1) for fraction in fractions]


def balancing_loss(grid_probs: Sequence[torch.Tensor], utilization: Sequence[torch.Tensor]) -> torch.Tensor:
    """Switch-Transformer load-balancing loss averaged over grid dimensions: size * sum(utilization * mean prob).

    It equals 1 when routing and probabilities are uniform and grows as both concentrate on the same indices.
    :param grid_probs: per dimension, [batch, size] gating probabilities
    :param utilization: per dimension, [size] fraction of samples routed to each index
    """
    terms = [
        probs.shape[-1] * (used.to(probs) * probs.mean(dim=0)).sum() for probs, used in zip(grid_probs, utilization)
    ]
    return torch.stack(terms).mean()


class RemoteSwitchMixtureOfExperts(RemoteMixtureOfExperts):
    """A mixture with Switch-Transformer routing; ``forward`` returns ``(outputs, balancing_loss)``.

    :param utilization_alpha: decay of the ``grid_utilization`` moving average of routed fractions
    :param grid_dropout: probability of KEEPING each grid index during training (1.0: no dropout)
    :param jitter_eps: multiplicative noise in [1 - eps, 1 + eps] on the gating input during training
    Other parameters are those of RemoteMixtureOfExperts. The input is added to the first output (residual).
    """

    def __init__(
        self,
        *,
        grid_size: Sequence[int],
        k_best: int = 1,
        k_min: int = 0,
        backward_k_min: int = 0,
        allow_zero_outputs: bool = True,
        utilization_alpha: float = 0.9,
        grid_dropout: float = 1.0,
        jitter_eps: float = 1e-2,
        **kwargs,
    ):
        if not (isinstance(jitter_eps, numbers.Real) and jitter_eps >= 0):  # (NaN too) torch's uniform_ refuses it
            raise ValueError(f"jitter_eps must be a non-negative number (0: no jitter), got {jitter_eps!r}")
        if not (isinstance(utilization_alpha, numbers.Real) and 0 <= utilization_alpha <= 1):  # else it diverges
            raise ValueError(f"utilization_alpha must be in [0, 1] (an average's decay), got {utilization_alpha!r}")
        routing = dict(k_best=k_best, k_min=k_min, backward_k_min=backward_k_min)
        super().__init__(grid_size=grid_size, allow_zero_outputs=allow_zero_outputs, **routing, **kwargs)
        self.utilization_alpha, self.grid_dropout, self.jitter_eps = utilization_alpha, grid_dropout, jitter_eps
        initial = torch.cat([torch.full((size,), 1.0 / size) for size in self.grid_size])
        self.register_buffer("grid_utilization", initial)

    def forward(self, input: torch.Tensor, *args: torch.Tensor, **kwargs: torch.Tensor) -> Tuple[Any, torch.Tensor]:
        deadline = None if self.forward_timeout is None else time.monotonic() + self.forward_timeout
        self.check_anomalies(input, *args, **kwargs)
        gating_input = input.mean(dim=tuple(range(1, input.ndim - 1))) if input.ndim > 2 else input
        if self.training and self.jitter_eps > 0:
            noise = torch.empty_like(gating_input).uniform_(1 - self.jitter_eps, 1 + self.jitter_eps)
            gating_input = gating_input * noise
        grid_scores = list(self.proj(gating_input).split_with_sizes(self.grid_size, dim=-1))
        if self.training and self.grid_dropout < 1:
            grid_scores = [self._drop_indices(scores) for scores in grid_scores]
        grid_log_probs = [torch.log_softmax(scores, dim=-1) for scores in grid_scores]
        if input.shape[0] == 0:  # no sample to route: no expert call, nothing to balance, utilization unchanged
            mixed = self.empty_batch_outputs(grid_scores, input.device, deadline)
            mixed[0] = mixed[0] + input
            loss = sum(log_probs.sum() for log_probs in grid_log_probs) * 0
            return nested_pack(mixed, structure=self._expert_info["outputs_schema"]), loss

        chosen_experts = self.find_experts(grid_scores, deadline)
        expert_mask, outputs = self.call_experts(chosen_experts, deadline, input, *args, **kwargs)
        expert_probs = self.compute_expert_scores(grid_log_probs, chosen_experts).exp()  # product over dimensions
        weights = torch.where(expert_mask.to(expert_probs.device), expert_probs, torch.zeros_like(expert_probs))
        mixed = [mix_expert_outputs(weights, stacked.to(weights.device)) for stacked in outputs]
        mixed[0] = mixed[0] + input

        if self.training:
            self._update_utilization(chosen_experts)
        # a copy: the next forward updates the buffer in place, and this loss's backward may come after it
        utilization = self.grid_utilization.clone().split(list(self.grid_size))
        loss = balancing_loss([log_probs.exp() for log_probs in grid_log_probs], utilization)
        return nested_pack(mixed, structure=self._expert_info["outputs_schema"]), loss

    def _drop_indices(self, scores: torch.Tensor) -> torch.Tensor:
        keep = torch.rand(scores.shape[-1], device=scores.device) < self.grid_dropout
        if not keep.any():
            keep[torch.randint(len(keep), (1,))] = True  # at least one index stays routable
        return torch.where(keep, scores, torch.full_like(scores, -float("inf")))

    @torch.no_grad()
    def _update_utilization(self, chosen_experts: List[List[RemoteExpert]]) -> None:
        uids = [[expert.uid for expert in experts] for experts in chosen_experts]
        fractions = torch.cat(routed_fractions(uids, self.uid_prefix, self.grid_size))
        alpha = self.utilization_alpha
        self.grid_utilization.copy_(alpha * self.grid_utilization + (1 - alpha) * fractions.to(self.grid_utilization))

    def compute_expert_scores(self, grid_scores: Sequence[torch.Tensor], batch_experts) -> torch.Tensor:
        uids = [[expert.uid for expert in experts] for experts in batch_experts]
        return compute_expert_scores(grid_scores, uids, self.uid_prefix)
