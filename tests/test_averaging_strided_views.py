"""Averaged tensors that are strided views (every other element, a column of a matrix) are averaged, and the
elements of their storage between theirs are left alone."""

import pytest
import torch
from averager_helpers import averagers_on, dht_swarm


@pytest.mark.timeout(60)
def test_a_strided_one_dimensional_view_is_averaged_and_its_neighbours_untouched():
    bases = [torch.full((4, 6), 10.0), torch.full((4, 6), 20.0)]
    for base, value in zip(bases, (0.0, 2.0)):
        base[:, 1] = value
    columns = [base[:, 1] for base in bases]  # 1-D, stride 6: flattening it gives a view, not a copy
    with dht_swarm(2) as dhts, averagers_on(dhts, [[column] for column in columns], target_group_size=2) as avgs:
        controls = [averager.step(wait=False, timeout=30) for averager in avgs]
        for control in controls:
            control.result(timeout=40)
        for averager, base, other in zip(avgs, bases, (10.0, 20.0)):
            with averager.get_tensors() as (column,):
                assert torch.equal(column, torch.ones(4))
            assert torch.equal(base[:, 1], torch.ones(4))  # the caller's view of the same (shared) memory
            assert torch.equal(base[:, [0, 2, 3, 4, 5]], torch.full((4, 5), other))
