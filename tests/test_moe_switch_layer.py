"""RemoteSwitchMixtureOfExperts called several times before one backward (gradient accumulation, a shared layer),
against a real expert server."""

import pytest
import torch
import torch.nn as nn
from moe_swarm_helpers import serving_experts

from hivemind.moe import ModuleBackend, RemoteSwitchMixtureOfExperts
from hivemind.moe.client.switch_moe import balancing_loss
from hivemind.utils.tensor_descr import BatchTensorDescriptor

HID = 4
GRID = (2, 2)


@pytest.mark.timeout(40)
def test_two_forwards_then_one_backward_gives_each_balancing_loss_its_own_utilization():
    torch.manual_seed(0)
    uids = [f"ffn.{i}.{j}" for i in range(GRID[0]) for j in range(GRID[1])]
    backends = {
        uid: ModuleBackend(uid, nn.Linear(HID, HID), args_schema=(BatchTensorDescriptor(HID),), max_batch_size=16)
        for uid in uids
    }
    with serving_experts(backends) as (_, client_dht):
        switch = RemoteSwitchMixtureOfExperts(
            in_features=HID, grid_size=GRID, dht=client_dht, uid_prefix="ffn.", jitter_eps=0
        )
        first, second = torch.randn(3, HID), torch.randn(3, HID)
        _, first_loss = switch(first)
        first_utilization = switch.grid_utilization.clone()
        _, second_loss = switch(second)  # updates the utilization buffer in place
        (first_loss + second_loss).backward()  # failed: a tensor saved for backward was modified in place
        gradient = switch.proj.weight.grad.clone()

        switch.proj.weight.grad = None
        expected = 0
        for inputs, utilization in ((first, first_utilization), (second, switch.grid_utilization)):
            probs = [torch.softmax(scores, dim=-1) for scores in switch.proj(inputs).split(list(GRID), dim=-1)]
            expected = expected + balancing_loss(probs, utilization.split(list(GRID)))
        assert torch.allclose(first_loss + second_loss, expected.detach(), atol=1e-6)
        expected.backward()
        assert torch.allclose(gradient, switch.proj.weight.grad, atol=1e-6)
