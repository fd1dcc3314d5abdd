"""How many elements of the averaged vector each group member reduces: a pure function of the gathered bandwidths.

Every member of a group runs the same arithmetic on the same inputs (the bandwidths everyone declared when the group
was formed), so all of them cut the vector at the same element indices without exchanging anything else.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import numpy as np

from hivemind.utils.logging import get_logger

__all__ = ["load_balance_peers", "optimize_parts_lp", "hagenbach_bishoff"]

logger = get_logger(__name__)

LP_DECIMALS = 9  # LP shares are rounded to this many decimals, so that solver noise cannot change the partition
_LP_TIME_TOLERANCE = 1e-9  # the second (tie-breaking) LP may exceed the optimal time by this much (relative)
_LP_NOISE = 1e-6  # smaller shares are solver noise and are dropped
# a member slower than this fraction of the fastest one counts as this slow (it gets no share either way): the LP's
# coefficients stay finite and well-conditioned whatever finite bandwidths a group declares
MIN_RELATIVE_BANDWIDTH = 1e-12


def load_balance_peers(vector_size: int, bandwidths: Sequence[Optional[float]], min_size: int = 0) -> Tuple[int, ...]:
    """Split ``vector_size`` elements among group members; returns one element count per member (sums to the size).

    :param bandwidths: one entry per member: its declared bandwidth, ``None`` if it declared none, 0 for members
        that must not reduce anything (client-mode peers)
    :param min_size: an LP share smaller than this many elements is given to the others instead
    When nobody declared a positive bandwidth, every member with ``None`` gets an equal share and the others none.
    Otherwise ``None`` stands for the mean of the positive bandwidths and the shares come from
    :func:`optimize_parts_lp`.
    """
    if vector_size < 0:
        raise ValueError(f"vector_size must be non-negative, got {vector_size}")
    values = [_as_bandwidth(bandwidth) for bandwidth in bandwidths]
    positive = [bandwidth for bandwidth in values if bandwidth is not None and bandwidth > 0]
    if not positive:
        scores = [1.0 if bandwidth is None else 0.0 for bandwidth in values]
    else:
        peak = max(positive)  # (a plain sum of declared values may overflow to inf)
        mean_bandwidth = peak * (sum(bandwidth / peak for bandwidth in positive) / len(positive))
        filled = [mean_bandwidth if bandwidth is None else bandwidth for bandwidth in values]
        scores = list(optimize_parts_lp(vector_size, filled, min_size))
    return tuple(hagenbach_bishoff(vector_size, scores))


def _as_bandwidth(bandwidth: Optional[float]) -> Optional[float]:
    if bandwidth is None:
        return None
    bandwidth = float(bandwidth)
    if math.isnan(bandwidth) or bandwidth < 0:
        return 0.0  # a meaningless declaration: this member reduces nothing
    return bandwidth


def optimize_parts_lp(vector_size: int, bandwidths: Sequence[float], min_size: int = 0) -> np.ndarray:
    """Fractions of the vector (summing to 1) that minimize the slowest member's time in a butterfly all-reduce.

    Model: with ``n`` members, a member reducing the fraction ``x`` of a vector of ``V`` elements sends ``x * V`` to
    each of the other ``n - 1`` members and the ``(1 - x) * V`` it does not reduce to the others, so it moves
    ``V * (1 + (n - 2) * x)`` elements each way over its link of bandwidth ``b``. The linear program minimizes the
    largest ``(1 + (n - 2) * x) / b``; among the optimal solutions it then picks the one that keeps the largest
    ``x / b`` smallest (shares proportional to bandwidth when the first objective does not decide, e.g. for two
    members). Both are solved with SciPy's HiGHS solver. Members with zero bandwidth get no share. Shares are rounded
    to 9 decimals, shares below one millionth (solver noise) and below ``min_size / vector_size`` are set to zero
    (the others then cover them). Note that the slowest member's own traffic bounds the time from below, so faster
    members share the reducing in proportion to their bandwidth as long as they stay within that bound.

    :raises ValueError: no member has a positive bandwidth
    """
    from scipy.optimize import linprog  # imported here: SciPy is only needed when bandwidths are declared

    bandwidths = np.asarray([float(bandwidth) for bandwidth in bandwidths], dtype=np.float64)
    group_size = len(bandwidths)
    if not np.all(np.isfinite(bandwidths)) or np.any(bandwidths < 0):
        raise ValueError(f"bandwidths must be finite and non-negative, got {bandwidths.tolist()}")
    active = np.flatnonzero(bandwidths > 0)
    if len(active) == 0:
        raise ValueError(f"at least one group member must have a positive bandwidth, got {bandwidths.tolist()}")
    fractions = np.zeros(group_size)
    if len(active) == 1:
        fractions[active[0]] = 1.0
        return _drop_small_shares(fractions, vector_size, min_size)

    scaled = np.maximum(bandwidths[active] / bandwidths[active].max(), MIN_RELATIVE_BANDWIDTH)  # well-conditioned
    num_active = len(active)
    # variables: x_1..x_k (fractions of the active members), then t (the time to minimize)
    sums_to_one = np.concatenate([np.ones(num_active), [0.0]])[None, :]
    bounds = [(0.0, 1.0)] * num_active + [(0.0, None)]
    # (1 + (n - 2) x_i) / b_i <= t   <=>   (n - 2) / b_i * x_i - t <= -1 / b_i
    time_rows = np.zeros((num_active, num_active + 1))
    time_rows[np.arange(num_active), np.arange(num_active)] = (group_size - 2) / scaled
    time_rows[:, -1] = -1.0
    time_bounds = -1.0 / scaled
    objective = np.zeros(num_active + 1)
    objective[-1] = 1.0
    first = linprog(objective, A_ub=time_rows, b_ub=time_bounds, A_eq=sums_to_one, b_eq=[1.0], bounds=bounds,
                    method="highs")  # fmt: skip
    if first.status != 0:
        raise ValueError(f"load balancing LP failed for bandwidths {bandwidths.tolist()}: {first.message}")
    best_time = first.x[-1]

    # variables: x_1..x_k, then s; minimize s subject to x_i / b_i <= s and staying within the optimal time
    share_rows = np.zeros((num_active, num_active + 1))
    share_rows[np.arange(num_active), np.arange(num_active)] = 1.0 / scaled
    share_rows[:, -1] = -1.0
    time_rows_fixed = time_rows[:, :-1]
    time_limit = best_time * (1 + _LP_TIME_TOLERANCE) - 1.0 / scaled
    rows = np.concatenate([share_rows, np.concatenate([time_rows_fixed, np.zeros((num_active, 1))], axis=1)])
    limits = np.concatenate([np.zeros(num_active), time_limit])
    second = linprog(objective, A_ub=rows, b_ub=limits, A_eq=sums_to_one, b_eq=[1.0], bounds=bounds, method="highs")
    solution = second.x[:num_active] if second.status == 0 else first.x[:num_active]
    fractions[active] = np.clip(solution, 0.0, 1.0)
    fractions = np.round(fractions, LP_DECIMALS)
    fractions[fractions < _LP_NOISE] = 0.0
    return _drop_small_shares(fractions, vector_size, min_size)


def _drop_small_shares(fractions: np.ndarray, vector_size: int, min_size: int) -> np.ndarray:
    if vector_size <= 0 or min_size <= 0:
        return fractions
    kept = np.where(fractions < min_size / vector_size, 0.0, fractions)
    if not kept.any():  # every share is below the minimum: the largest one takes the whole vector
        kept = np.zeros_like(fractions)
        kept[int(np.argmax(fractions))] = 1.0
    return kept


def hagenbach_bishoff(vector_size: int, scores: Sequence[float]) -> List[int]:
    """Integer element counts proportional to ``scores`` that sum to ``vector_size`` (the Hagenbach-Bischoff method).

    Each member first gets ``floor(vector_size * score / sum(scores))``; the elements left over go one at a time to
    the member with the largest ``score / (count + 1)`` (the earliest one on ties).

    :raises ValueError: scores are negative or not finite, or all zero while there are elements to share
    """
    scores = [float(score) for score in scores]
    if any(not math.isfinite(score) or score < 0 for score in scores):
        raise ValueError(f"scores must be finite and non-negative, got {scores}")
    total_score = 0.0
    for score in scores:  # left to right, as every implementation must
        total_score += score
    if vector_size == 0:
        return [0] * len(scores)
    if total_score <= 0:
        raise ValueError(f"cannot split {vector_size} elements: no group member has a positive share ({scores})")
    counts = [math.floor(vector_size * score / total_score) for score in scores]
    remaining = vector_size - sum(counts)
    while remaining > 0:
        best = max(range(len(scores)), key=lambda i: (scores[i] / (counts[i] + 1), -i))
        counts[best] += 1
        remaining -= 1
    while remaining < 0:  # rounding made the floors overshoot (only possible with pathological float scores)
        best = max((i for i in range(len(scores)) if counts[i] > 0), key=lambda i: (counts[i] / scores[i], i))
        counts[best] -= 1
        remaining += 1
    return counts
