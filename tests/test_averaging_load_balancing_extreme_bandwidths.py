"""Load balancing gives every member a share whatever finite bandwidths the group declared: a member that declares an
extreme value (e.g. 1e308 or 1e-300, which pass every check of a gather payload) cannot make the whole group's
round fail, since every member computes the partition from the same declarations."""

import warnings

import pytest

from hivemind.averaging.load_balancing import load_balance_peers


@pytest.mark.parametrize(
    "bandwidths, fastest",
    [
        ([1e308, 1.0, 1.0], 0),
        ([1e-300, 1.0, 1.0], 1),
        ([5e-324, 1.0], 1),
        ([1e308, 1e-308, 1.0], 0),
        ([3.4e38, 1e-38, 1.0], 0),  # both within float32, as this implementation's own peers declare
        ([1e308, 1e308, None], 1),  # their mean (for the member without one) overflows a plain sum
    ],
)
def test_extreme_declared_bandwidths_still_split_the_vector(bandwidths, fastest):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow or division by zero on the way
        counts = load_balance_peers(10**6, bandwidths)
    assert sum(counts) == 10**6 and min(counts) >= 0
    assert counts[fastest] == max(counts)  # (with equal bandwidths: the one given the element left over)
