"""DecentralizedAverager with integer tensors: the all-reduce rounds their average, and the averager applies it."""

import pytest
import torch
from averager_helpers import averagers_on, dht_swarm


def _step_all(averagers, timeout: float = 30.0):
    controls = [averager.step(wait=False, timeout=timeout) for averager in averagers]
    return [control.result(timeout=timeout + 10) for control in controls]


def _local(averager):
    with averager.get_tensors() as tensors:
        return [tensor.clone() for tensor in tensors]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_integer_tensors_end_at_the_rounded_mean_on_every_peer(dtype):
    tensors = [[torch.tensor([0, 0, 5, -7], dtype=dtype)], [torch.tensor([1, 3, 8, 2], dtype=dtype)]]
    with dht_swarm(2) as dhts, averagers_on(dhts, tensors, target_group_size=2) as averagers:
        _step_all(averagers)
        expected = torch.tensor([0, 2, 6, -2], dtype=dtype)  # means 0.5, 1.5, 6.5, -2.5 rounded half to even
        for averager in averagers:
            (result,) = _local(averager)
            assert result.dtype == dtype and torch.equal(result, expected), result


@pytest.mark.timeout(60)
def test_averaging_alpha_moves_integer_tensors_a_rounded_part_of_the_way():
    tensors = [[torch.zeros(4, dtype=torch.int64)], [torch.full((4,), 8, dtype=torch.int64)]]
    with dht_swarm(2) as dhts, averagers_on(dhts, tensors, target_group_size=2, averaging_alpha=0.25) as averagers:
        _step_all(averagers)
        assert torch.equal(_local(averagers[0])[0], torch.full((4,), 1, dtype=torch.int64))  # 0 + 0.25 * 4
        assert torch.equal(_local(averagers[1])[0], torch.full((4,), 7, dtype=torch.int64))  # 8 - 0.25 * 4


def test_boolean_tensors_are_refused_with_a_reason():
    from hivemind.averaging.averager import DecentralizedAverager
    from hivemind.dht import DHT

    with DHT(start=True) as dht:
        with pytest.raises(ValueError, match=r"averaged_tensors\[1\] is a bool tensor"):
            DecentralizedAverager([torch.zeros(2), torch.ones(2, dtype=torch.bool)], dht, start=False, prefix="p")
