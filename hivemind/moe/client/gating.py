"""Plain functions of mixture-of-experts gating: expert scores, masked weights, mixing, stopping rules, penalties."""

from __future__ import annotations

import threading
import time
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from hivemind.moe.expert_uid import UID_DELIMITER, ExpertPrefix, ExpertUID

__all__ = [
    "uid_coordinates",
    "unroutable_samples",
    "compute_expert_scores",
    "masked_expert_weights",
    "mix_expert_outputs",
    "all_samples_settled",
    "ExpertFailurePenalty",
    "penalty_key",
]


def uid_coordinates(uid: ExpertUID, uid_prefix: ExpertPrefix, grid_size: Sequence[int]) -> List[int]:
    """The grid coordinates of ``uid`` (``ffn.3.14`` with prefix ``ffn.`` -> [3, 14]); ValueError outside the grid."""
    if not uid.startswith(uid_prefix):
        raise ValueError(f"expert {uid!r} does not belong to the grid {uid_prefix!r}")
    coordinates = [int(part) for part in uid[len(uid_prefix) :].split(UID_DELIMITER)]
    if len(coordinates) != len(grid_size) or not all(0 <= c < size for c, size in zip(coordinates, grid_size)):
        raise ValueError(f"expert {uid!r} is outside the grid {uid_prefix!r} of size {tuple(grid_size)}")
    return coordinates


def unroutable_samples(grid_scores: Sequence[torch.Tensor]) -> List[int]:
    """Samples that no expert can be chosen for: in some grid dimension, none of their scores is usable (every one
    is NaN, as when the input has NaN values, or -inf, which marks an index left out).

    :param grid_scores: one [batch, grid_size[d]] tensor per grid dimension
    """
    stuck = None
    for dim_scores in grid_scores:
        scores = dim_scores.detach()
        dim_stuck = ~(~torch.isnan(scores) & (scores != -float("inf"))).any(dim=-1)
        stuck = dim_stuck if stuck is None else stuck | dim_stuck
    return [] if stuck is None else stuck.nonzero().flatten().tolist()


def compute_expert_scores(
    grid_scores: Sequence[torch.Tensor],
    batch_uids: Sequence[Sequence[ExpertUID]],
    uid_prefix: ExpertPrefix,
) -> torch.Tensor:
    """Score of each chosen expert: the sum of its coordinates' scores, as a [batch, max_k] tensor (-inf padding).

    :param grid_scores: one [batch, grid_size[d]] tensor per grid dimension
    :param batch_uids: the uids chosen for each sample (at most max_k each)
    """
    batch_size = len(batch_uids)
    max_k = max((len(uids) for uids in batch_uids), default=0)
    reference = grid_scores[0]
    scores = torch.full((batch_size, max_k), -float("inf"), dtype=reference.dtype, device=reference.device)
    rows, slots, coordinates = [], [], []
    grid_size = [dim_scores.shape[-1] for dim_scores in grid_scores]
    parsed: Dict[ExpertUID, List[int]] = {}  # samples share experts: each distinct uid is parsed once
    for row, uids in enumerate(batch_uids):
        for slot, uid in enumerate(uids):
            if uid not in parsed:
                parsed[uid] = uid_coordinates(uid, uid_prefix, grid_size)
            rows.append(row), slots.append(slot), coordinates.append(parsed[uid])
    if not rows:
        return scores
    rows_t, slots_t = torch.tensor(rows, device=reference.device), torch.tensor(slots, device=reference.device)
    coordinates_t = torch.tensor(coordinates, device=reference.device)
    flat_scores = sum(dim_scores[rows_t, coordinates_t[:, dim]] for dim, dim_scores in enumerate(grid_scores))
    return scores.index_put((rows_t, slots_t), flat_scores)


def masked_expert_weights(logits: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
    """Softmax over the alive experts of each sample; a sample with none alive gets all-zero weights (never NaN).

    :param logits: [batch, max_k] expert scores (may be -inf where no expert was chosen)
    :param alive: [batch, max_k] bool mask of experts that answered
    """
    any_alive = alive.any(dim=1, keepdim=True)
    # rows without alive experts get finite dummy logits, so that neither softmax nor its gradient produce NaN
    safe_logits = torch.where(alive, logits, torch.full_like(logits, -float("inf")))
    safe_logits = torch.where(any_alive, safe_logits, torch.zeros_like(logits))
    weights = torch.softmax(safe_logits, dim=1)
    return weights * any_alive.to(weights.dtype)


def mix_expert_outputs(weights: torch.Tensor, stacked: torch.Tensor) -> torch.Tensor:
    """Weighted sum over experts: weights [batch, k] and stacked outputs [batch, k, ...] -> [batch, ...], in the dtype
    that torch promotes the two to (integer outputs mix to floats, half-precision ones to the weights' precision)."""
    dtype = torch.promote_types(weights.dtype, stacked.dtype)
    flat = stacked.flatten(start_dim=2) if stacked.ndim > 2 else stacked.unsqueeze(-1)
    mixed = (weights.to(dtype).unsqueeze(-1) * flat.to(dtype)).sum(dim=1)
    return mixed.view(stacked.shape[:1] + stacked.shape[2:])


def all_samples_settled(answered: torch.Tensor, pending: torch.Tensor, k_min: int) -> bool:
    """True once every sample has ``k_min`` answers or nothing left to wait for (per-sample counts)."""
    return bool(((answered >= k_min) | (pending == 0)).all())


PenaltyKey = Union[ExpertUID, Tuple[ExpertUID, object]]  # a uid, or (uid, peer id): that uid on one server


class ExpertFailurePenalty:
    """Experts that recently failed or timed out, skipped until their penalty ends (then tried again).

    Each consecutive failure doubles the penalty, from ``base`` up to ``maximum`` seconds; a success clears it. This
    keeps a dead server from costing a full timeout at every step until its DHT announcements expire.

    Mixtures report an expert as ``(uid, peer_id)``: the same uid served by another server (a replica, or the server
    that took over) is not skipped for the failures of the first. ``is_penalized`` with a bare uid tells whether that
    uid is penalized on any server.
    """

    max_entries = 4096  # above this many remembered experts, stale ones are dropped

    def __init__(self, base: float = 10.0, maximum: float = 120.0, clock=time.monotonic):
        self.base, self.maximum, self.clock = base, maximum, clock
        self._until: Dict[PenaltyKey, float] = {}
        self._failures: Dict[PenaltyKey, int] = {}
        self._lock = threading.Lock()  # a mixture may be called from several threads at once

    def __getstate__(self):  # (a mixture sent to a spawned DataLoader worker takes its penalties along)
        state = self.__dict__.copy()
        del state["_lock"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def is_penalized(self, uid: PenaltyKey, now: Optional[float] = None) -> bool:
        """Whether the expert is skipped now: ``(uid, peer_id)`` also while its whole server is (see
        ``report_failure(..., server_down=True)``)."""
        now = now if now is not None else self.clock()
        if isinstance(uid, str):  # a bare uid: on any server
            with self._lock:
                return any(now < until and _uid_of(key) == uid for key, until in self._until.items())
        for key in (uid, _server_key(uid)):
            until = self._until.get(key)
            if until is not None and now < until:
                return True
        return False

    def num_penalized(self, now: Optional[float] = None) -> int:
        """How many experts (keys) are penalized right now."""
        now = now if now is not None else self.clock()
        with self._lock:
            return sum(now < until for until in self._until.values())

    def report_failure(self, uid: PenaltyKey, server_down: bool = False) -> None:
        """Penalize the expert; with ``server_down`` (it timed out or could not be reached: not an error that its
        server answered with) every expert of its server too, until one of them answers."""
        with self._lock:
            self._report_failure(uid)
            if server_down and not isinstance(uid, str):
                self._report_failure(_server_key(uid))

    def _report_failure(self, uid: PenaltyKey) -> None:
        if len(self._until) >= self.max_entries:  # forget experts whose penalty ended long ago
            now = self.clock()
            for stale in [key for key, until in self._until.items() if until + self.maximum < now]:
                self._until.pop(stale), self._failures.pop(stale, None)
        failures = self._failures.get(uid, 0) + 1
        self._failures[uid] = failures
        self._until[uid] = self.clock() + min(self.base * 2 ** (failures - 1), self.maximum)

    def report_success(self, uid: PenaltyKey) -> None:
        with self._lock:
            for key in (uid,) if isinstance(uid, str) else (uid, _server_key(uid)):
                self._until.pop(key, None)
                self._failures.pop(key, None)


def _server_key(key: Tuple[ExpertUID, object]) -> Tuple[None, object]:
    return None, key[1]  # every uid on that server


def _uid_of(key: PenaltyKey) -> ExpertUID:
    return key if isinstance(key, str) else key[0]


def penalty_key(expert) -> Tuple[ExpertUID, object]:
    """How a mixture reports ``expert`` (a RemoteExpert) to its ExpertFailurePenalty: its uid on its server."""
    return expert.uid, expert.peer_id
