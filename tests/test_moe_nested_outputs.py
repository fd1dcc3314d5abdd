"""Server.create with a registered expert class whose outputs are a nested structure (a dict of tensors): its
schema keeps that structure and a RemoteExpert returns what the module returns locally."""

import pytest
import torch
import torch.nn as nn

from hivemind.dht import DHT
from hivemind.moe import RemoteExpert, register_expert_class
from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker
from hivemind.moe.expert_uid import ExpertInfo
from hivemind.moe.server.layers import name_to_block
from hivemind.moe.server.server import Server

HIDDEN = 8
EXPERT_CLASS = "nested_dict_outputs"


class DictOutputs(nn.Module):
    """Two outputs by name: a projection and a per-example scale."""

    def __init__(self, hidden_dim: int):
        super().__init__()
        self.linear = nn.Linear(hidden_dim, hidden_dim)

    def forward(self, x: torch.Tensor):
        return {"projection": self.linear(x), "scale": torch.tanh(x).sum(dim=-1, keepdim=True)}


if EXPERT_CLASS not in name_to_block:
    register_expert_class(EXPERT_CLASS, lambda batch_size, hidden_dim: torch.empty(batch_size, hidden_dim))(
        DictOutputs
    )


@pytest.mark.timeout(60)
def test_expert_class_with_dict_outputs_serves_them_like_the_local_module():
    server = Server.create(
        expert_uids=["named.0"],
        expert_cls=EXPERT_CLASS,
        hidden_dim=HIDDEN,
        optim_cls=None,
        device="cpu",
        host_maddrs=["/ip4/127.0.0.1/tcp/0"],
        start=True,
    )
    client_dht = DHT(initial_peers=server.dht.get_visible_maddrs(), start=True)
    try:
        p2p = RemoteExpertWorker.run_coroutine(client_dht.replicate_p2p())
        expert = RemoteExpert(ExpertInfo("named.0", server.dht.peer_id), p2p)
        local = server.module_backends["named.0"].module
        inputs = torch.randn(5, HIDDEN, requires_grad=True)
        local_inputs = inputs.detach().clone().requires_grad_(True)

        outputs = expert(inputs)
        (outputs["projection"].sum() + 2 * outputs["scale"].sum()).backward()
        local_outputs = local(local_inputs)
        (local_outputs["projection"].sum() + 2 * local_outputs["scale"].sum()).backward()

        assert set(outputs) == {"projection", "scale"} and outputs["scale"].shape == (5, 1)
        for name in outputs:
            assert torch.allclose(outputs[name], local_outputs[name], atol=1e-5)
        assert torch.allclose(inputs.grad, local_inputs.grad, atol=1e-5)
    finally:
        client_dht.shutdown()
        server.shutdown()
