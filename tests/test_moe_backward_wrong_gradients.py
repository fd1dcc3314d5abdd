"""A mixture's backward when one expert answers gradients that do not fit its inputs, over real daemons."""

import pytest
import torch
import torch.nn as nn
from moe_client_fakes import FakeExpertServer

from hivemind.dht import DHT
from hivemind.moe import RemoteMixtureOfExperts

HID = 4
UIDS = ["ffn.0", "ffn.1"]


@pytest.mark.timeout(60)
def test_expert_answering_gradients_of_the_wrong_shape_is_masked_and_penalized():
    torch.manual_seed(0)
    modules = {uid: nn.Linear(HID, HID) for uid in UIDS}
    server = FakeExpertServer(modules, HID)
    honest_backward = server.handler._backward

    async def backward(uid, tensors):
        grads = await honest_backward(uid, tensors)
        return [grads[0][:, :1]] if uid == "ffn.1" else grads  # one column of the gradient

    server.handler._backward = backward
    client_dht = DHT(start=True, initial_peers=server.dht.get_visible_maddrs(), host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    try:
        moe = RemoteMixtureOfExperts(in_features=HID, grid_size=(2,), dht=client_dht, uid_prefix="ffn.", k_best=2)
        x = torch.randn(3, HID, requires_grad=True)
        moe(x).sum().backward()
        weights = torch.softmax(moe.proj(x.detach()), dim=-1)
        # only ffn.0's share of the gradient: ffn.1's answer is dropped as a whole
        expected = weights[:, :1] * modules["ffn.0"].weight.sum(dim=0)
        assert torch.isfinite(x.grad).all()
        assert torch.allclose(x.grad - expected, _gating_grad(moe, x, modules), atol=1e-5)
        assert moe.failure_penalty.is_penalized("ffn.1") and not moe.failure_penalty.is_penalized("ffn.0")
    finally:
        client_dht.shutdown()
        server.stop()


def _gating_grad(moe, x, modules):
    """The gradient that reaches x through the gating weights (the experts' outputs taken as constants)."""
    x = x.detach().requires_grad_(True)
    with torch.no_grad():
        outputs = torch.stack([modules[uid](x) for uid in UIDS], dim=1)
    weights = torch.softmax(moe.proj(x), dim=-1)
    (weights.unsqueeze(-1) * outputs).sum().backward()
    return x.grad
