"""Averaged tensors that share memory (the same tensor passed twice, as a state_dict lists tied weights; views that
overlap) end at the average: the shared elements used to be moved once per tensor that holds them (peers of 0 and 2
swapped values instead of meeting at 1)."""

import pytest
import torch

import hivemind
from hivemind.averaging import DecentralizedAverager


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
    bootstrap = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    dhts = [
        hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=bootstrap.get_visible_maddrs())
        for _ in range(2)
    ]
    averagers = []
    try:
        averagers = [
            DecentralizedAverager(
                own, dht, prefix="aliased", target_group_size=2, min_group_size=2, start=True,
                min_matchmaking_time=2.0, request_timeout=1.0,
            )
            for own, dht in zip(tensors, dhts)
        ]  # fmt: skip
        controls = [averager.step(wait=False, timeout=30) for averager in averagers]
        for control in controls:
            assert len(control.result(timeout=60)) == 2
        for averager, buffer in zip(averagers, buffers):
            with averager.get_tensors() as averaged:
                for tensor in averaged:
                    assert torch.equal(tensor, torch.ones_like(tensor))
            assert torch.equal(buffer, torch.ones(10))
    finally:
        for averager in averagers:
            averager.shutdown()
        for dht in dhts + [bootstrap]:
            dht.shutdown()
