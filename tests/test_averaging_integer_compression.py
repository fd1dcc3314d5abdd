"""An averager with a lossy codec averages its integer tensors too: they travel uncompressed and stay exact."""

import pytest
import torch
from averager_helpers import averagers_on, dht_swarm

from hivemind.compression import Float16Compression


@pytest.mark.timeout(60)
def test_float16_averager_with_an_integer_tensor_completes_and_keeps_integers_exact():
    tensors = [
        [torch.full((3, 5), 1.0), torch.tensor([0, 4, -6, 2**40], dtype=torch.int64)],
        [torch.full((3, 5), 3.0), torch.tensor([2, 8, -2, 2**40 + 2], dtype=torch.int64)],
    ]
    with (
        dht_swarm(2) as dhts,
        averagers_on(dhts, tensors, target_group_size=2, compression=Float16Compression()) as averagers,
    ):
        controls = [averager.step(wait=False, timeout=20) for averager in averagers]
        results = [control.result(timeout=30) for control in controls]
        assert all(result is not None for result in results)
        for averager in averagers:
            with averager.get_tensors() as (floats, ints):
                assert torch.allclose(floats, torch.full((3, 5), 2.0))
                assert ints.dtype == torch.int64
                assert torch.equal(ints, torch.tensor([1, 6, -4, 2**40 + 1], dtype=torch.int64))
