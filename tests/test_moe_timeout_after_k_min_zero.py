"""timeout_after_k_min=0 (once every sample has k_min answers, wait for no straggler) is a setting hivemind 1.1.12
accepts and runs with; it was refused at construction as 'must be a positive number'."""

import pytest
import torch

from hivemind.dht import DHT
from hivemind.moe import RemoteMixtureOfExperts, RemoteSwitchMixtureOfExperts
from hivemind.moe.server import background_server

HIDDEN = 8


@pytest.mark.timeout(90)
@pytest.mark.parametrize("cls", [RemoteMixtureOfExperts, RemoteSwitchMixtureOfExperts])
def test_a_mixture_with_timeout_after_k_min_zero_runs_forward_and_backward(cls):
    uids = ["ffn.0", "ffn.1", "ffn.2", "ffn.3"]
    with background_server(
        expert_uids=uids, hidden_dim=HIDDEN, host_maddrs=["/ip4/127.0.0.1/tcp/0"], device="cpu"
    ) as server_info:
        with DHT(initial_peers=server_info.addrs, start=True) as dht:
            moe = cls(dht=dht, uid_prefix="ffn.", grid_size=(4,), in_features=HIDDEN, k_best=2, timeout_after_k_min=0)
            inputs = torch.randn(5, HIDDEN, requires_grad=True)
            outputs = moe(inputs)
            outputs = outputs[0] if isinstance(outputs, tuple) else outputs
            assert outputs.shape == (5, HIDDEN)
            outputs.sum().backward()
            assert inputs.grad is not None and torch.isfinite(inputs.grad).all()
