"""Averaged tensors that share memory (the same tensor passed twice, as a state_dict lists tied weights; views that
overlap) end at the average: the shared elements used to be moved once per tensor that holds them (peers of 0 and 2
swapped values instead of meeting at 1)."""

import pytest
import torch
from averager_helpers import averagers_on, dht_swarm


def _same_tensor_twice(buffer):
    return [buffer, buffer]


def _overlapping_views(buffer):
    return [buffer[:6], buffer[4:]]


def _tied_in_a_state_dict(buffer):
    model = torch.nn.Linear(5, 2, bias=False)
    model.weight = torch.nn.Parameter(buffer.view(2, 5))
    tied = torch.nn.ModuleDict({"encoder": model, "decoder": model})
    return [tensor for tensor in tied.state_dict(keep_vars=True).values()]


@pytest.mark.timeout(90)
@pytest.mark.parametrize("make_tensors", [_same_tensor_twice, _overlapping_views, _tied_in_a_state_dict])
def test_tensors_that_share_memory_end_at_the_average(make_tensors):
    buffers = [torch.zeros(10), torch.full((10,), 2.0)]
    with torch.no_grad():
        tensors = [make_tensors(buffer) for buffer in buffers]
    options = dict(target_group_size=2, min_group_size=2, min_matchmaking_time=2.0, request_timeout=1.0)
    with dht_swarm(3) as dhts, averagers_on(dhts[1:], tensors, prefix="aliased", **options) as averagers:
        controls = [averager.step(wait=False, timeout=30) for averager in averagers]
        for control in controls:
            assert len(control.result(timeout=60)) == 2
        for averager, buffer in zip(averagers, buffers):
            with averager.get_tensors() as averaged:
                for tensor in averaged:
                    assert torch.equal(tensor, torch.ones_like(tensor))
            assert torch.equal(buffer, torch.ones(10))
