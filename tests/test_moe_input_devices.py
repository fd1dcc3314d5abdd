"""Inputs on an accelerator: outputs of a RemoteExpert are CPU tensors, but the gradients of its inputs (and of a
mixture's inputs) must come back on the inputs' own device, or autograd refuses them ("invalid gradient")."""

import pytest
import torch
from moe_client_fakes import FakeExpertServer
from test_moe_routing import GRID, HID, UIDS, make_experts

from hivemind.dht import DHT
from hivemind.moe import RemoteMixtureOfExperts
from hivemind.moe.server.dht_handler import get_experts

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")),
]


@pytest.fixture(scope="module")
def swarm():
    server = FakeExpertServer(make_experts(UIDS), HID)
    client_dht = DHT(start=True, initial_peers=server.dht.get_visible_maddrs(), host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    try:
        yield server.handler.modules, client_dht
    finally:
        client_dht.shutdown()
        server.stop()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("device", DEVICES)
def test_remote_expert_gradients_come_back_on_the_inputs_device(swarm, device):
    modules, client_dht = swarm
    (expert,) = get_experts(client_dht, ["ffn.0.1"])
    inputs = torch.randn(3, HID, device=device, requires_grad=True)
    local_inputs = inputs.detach().cpu().requires_grad_(True)

    output = expert(inputs)
    (output * torch.arange(HID)).sum().backward()
    (modules["ffn.0.1"](local_inputs) * torch.arange(HID)).sum().backward()

    assert output.device == torch.device("cpu")
    assert inputs.grad.device == inputs.device
    assert torch.allclose(inputs.grad.cpu(), local_inputs.grad, atol=1e-5)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("device", DEVICES)
def test_mixture_on_the_inputs_device_backpropagates_to_them(swarm, device):
    _, client_dht = swarm
    moe = RemoteMixtureOfExperts(in_features=HID, grid_size=GRID, dht=client_dht, uid_prefix="ffn.", k_best=2)
    moe = moe.to(device)
    inputs = torch.randn(4, HID, device=device, requires_grad=True)

    output = moe(inputs)
    output.pow(2).sum().backward()

    assert output.device == inputs.device
    assert inputs.grad.device == inputs.device and torch.isfinite(inputs.grad).all() and inputs.grad.any()
    assert moe.proj.weight.grad.device == inputs.device and moe.proj.weight.grad.any()
