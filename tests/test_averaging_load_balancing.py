"""Load balancing: how many elements each group member reduces (pure arithmetic, no network)."""

import random

import numpy as np
import pytest

from hivemind.averaging.load_balancing import hagenbach_bishoff, load_balance_peers, optimize_parts_lp


def test_without_bandwidths_members_share_equally_and_the_first_get_the_remainder():
    assert load_balance_peers(10, [None, None, None]) == (4, 3, 3)
    assert load_balance_peers(100, [None] * 4) == (25, 25, 25, 25)


def test_members_with_zero_bandwidth_reduce_nothing():
    assert load_balance_peers(100, [None, 0, None]) == (50, 0, 50)
    assert load_balance_peers(100, [4.0, 0.0, 4.0]) == (50, 0, 50)


def test_two_members_share_in_proportion_to_bandwidth():
    assert load_balance_peers(100, [1.0, 3.0]) == (25, 75)
    np.testing.assert_allclose(optimize_parts_lp(100, [5.0, 10.0]), [1 / 3, 2 / 3], atol=1e-8)


def test_undeclared_bandwidth_counts_as_the_mean_of_the_declared_ones():
    assert load_balance_peers(90, [1.0, None, 2.0]) == load_balance_peers(90, [1.0, 1.5, 2.0])


@pytest.mark.parametrize("bandwidths", [[1.0, 1.0, 1.0, 1.0], [1.0, 2.0, 3.0, 10.0], [10.0, 10.0, 10.0, 1.0, 0.0]])
def test_lp_never_slows_the_slowest_member_and_splits_the_rest_by_bandwidth(bandwidths):
    fractions = optimize_parts_lp(1000, bandwidths)
    n = len(bandwidths)
    assert fractions.sum() == pytest.approx(1.0, abs=1e-8) and (fractions >= 0).all()
    positive = [b for b in bandwidths if b > 0]
    # the optimum: the slowest member's own traffic, or the level at which the others can absorb the whole vector
    low, high = 0.0, 1e6
    for _ in range(200):
        level = (low + high) / 2
        absorbed = sum(max(0.0, (level * b - 1) / (n - 2)) for b in positive) if n > 2 else 1.0
        low, high = (level, high) if absorbed < 1 else (low, level)
    best_time = max(high, 1 / min(positive))
    times = [(1 + (n - 2) * x) / b for x, b in zip(fractions, bandwidths) if b > 0]
    assert max(times) <= best_time * (1 + 1e-6)
    # members that have room share the vector in proportion to their bandwidth
    busy = [i for i, b in enumerate(bandwidths) if fractions[i] > 0]
    ratios = [fractions[i] / bandwidths[i] for i in busy]
    np.testing.assert_allclose(ratios, ratios[0], rtol=1e-6)


def test_lp_shares_below_min_size_are_dropped():
    fractions = optimize_parts_lp(100, [1.0, 1.0, 30.0], min_size=10)
    assert fractions[0] == 0 and fractions[1] == 0 and fractions[2] > 0
    assert load_balance_peers(100, [1.0, 1.0, 30.0], min_size=10) == (0, 0, 100)


def test_lp_rejects_groups_where_nobody_can_reduce():
    with pytest.raises(ValueError):
        optimize_parts_lp(100, [0.0, 0.0])
    with pytest.raises(ValueError):
        load_balance_peers(100, [0.0, 0.0])


def test_hagenbach_bishoff_gives_leftovers_by_largest_score_per_seat_first_index_on_ties():
    assert hagenbach_bishoff(10, [1, 1, 1]) == [4, 3, 3]
    assert hagenbach_bishoff(7, [0.5, 0.25, 0.25]) == [4, 2, 1]
    assert hagenbach_bishoff(0, [1, 2]) == [0, 0]
    assert hagenbach_bishoff(5, [0, 1]) == [0, 5]
    with pytest.raises(ValueError):
        hagenbach_bishoff(5, [0, 0])
    with pytest.raises(ValueError):
        hagenbach_bishoff(5, [1, -1])


def test_counts_survive_a_round_trip_through_fractions():
    rng = random.Random(0)
    for _ in range(500):
        total = rng.randint(1, 10**9)
        counts = hagenbach_bishoff(total, [rng.random() for _ in range(rng.randint(1, 16))])
        assert sum(counts) == total
        assert hagenbach_bishoff(total, [count / total for count in counts]) == counts
        assert hagenbach_bishoff(total, counts) == counts
