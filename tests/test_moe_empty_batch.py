"""Mixture-of-experts layers with a batch of no samples, and the constructor's checks of k_best / k_min."""

import pytest
import torch

from hivemind.dht import DHT
from hivemind.moe import RemoteMixtureOfExperts, RemoteSwitchMixtureOfExperts
from hivemind.moe.client import moe as moe_module
from hivemind.moe.server import background_server

HIDDEN = 8
LOOPBACK = dict(host_maddrs=["/ip4/127.0.0.1/tcp/0"], device="cpu")


@pytest.fixture(scope="module")
def client_dht():
    with background_server(
        expert_uids=["ffn.0.0", "ffn.0.1", "ffn.1.0", "ffn.1.1"], hidden_dim=HIDDEN, **LOOPBACK
    ) as server_info:
        dht = DHT(initial_peers=server_info.addrs, start=True)
        try:
            yield dht
        finally:
            dht.shutdown()


@pytest.fixture
def no_expert_calls(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("an expert was called for an empty batch")

    monkeypatch.setattr(moe_module.RemoteCallMany, "apply", refuse)


@pytest.mark.timeout(60)
def test_empty_batch_gives_an_empty_output_without_calling_experts(client_dht, no_expert_calls):
    moe = RemoteMixtureOfExperts(dht=client_dht, uid_prefix="ffn.", grid_size=(2, 2), in_features=HIDDEN, k_best=2)
    output = moe(torch.randn(0, HIDDEN, requires_grad=True))
    assert output.shape == (0, HIDDEN) and output.dtype == torch.float32
    output.sum().backward()  # an empty batch trains like any other: the graph exists, the gradients are zero
    assert moe.proj.weight.grad is not None and not moe.proj.weight.grad.any()


@pytest.mark.timeout(60)
def test_empty_batch_after_a_full_batch_keeps_the_output_shape(client_dht):
    moe = RemoteMixtureOfExperts(dht=client_dht, uid_prefix="ffn.", grid_size=(2, 2), in_features=HIDDEN, k_best=2)
    assert moe(torch.randn(3, HIDDEN)).shape == (3, HIDDEN)
    assert moe(torch.randn(0, HIDDEN)).shape == (0, HIDDEN)


@pytest.mark.timeout(60)
def test_switch_moe_empty_batch_gives_an_empty_output_and_a_finite_loss(client_dht, no_expert_calls):
    moe = RemoteSwitchMixtureOfExperts(dht=client_dht, uid_prefix="ffn.", grid_size=(2, 2), in_features=HIDDEN)
    utilization = moe.grid_utilization.clone()
    output, loss = moe(torch.randn(0, HIDDEN))
    assert output.shape == (0, HIDDEN)
    assert loss.shape == () and torch.isfinite(loss)
    assert torch.equal(moe.grid_utilization, utilization)  # no sample was routed


@pytest.mark.parametrize(
    "routing, argument",
    [
        (dict(k_best=0), "k_best"),
        (dict(k_best=-1), "k_best"),
        (dict(k_best=2, k_min=3), "k_min"),
        (dict(k_best=2, k_min=-1), "k_min"),
        (dict(k_best=2, backward_k_min=3), "backward_k_min"),
    ],
)
@pytest.mark.parametrize("layer", [RemoteMixtureOfExperts, RemoteSwitchMixtureOfExperts])
def test_constructor_refuses_impossible_k_best_and_k_min(layer, routing, argument):
    with pytest.raises(ValueError, match=argument):
        layer(dht=DHT(start=False), uid_prefix="ffn.", grid_size=(2, 2), in_features=HIDDEN, **routing)
