"""A ModuleBackend whose module returns more outputs than a declared outputs_schema describes serves the described
ones, as hivemind 1.1.12 does (e.g. a transformer block that returns (hidden_states, attention weights) served with
outputs_schema=BatchTensorDescriptor(hidden_size)); an inferred schema describes all of them anyway."""

import pytest
import torch

from hivemind import DHT
from hivemind.moe.client.expert import create_remote_experts
from hivemind.moe.expert_uid import ExpertInfo
from hivemind.moe.server import Server
from hivemind.moe.server.module_backend import ModuleBackend
from hivemind.utils.tensor_descr import BatchTensorDescriptor


class HiddenAndExtras(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(8, 8)

    def forward(self, x):
        hidden = self.linear(x)
        return hidden, hidden.detach() * 2  # (say, attention weights that clients do not need)


def _backend() -> ModuleBackend:
    torch.manual_seed(0)
    schema = BatchTensorDescriptor(8)
    return ModuleBackend("block.0", HiddenAndExtras(), args_schema=(schema,), outputs_schema=schema, max_batch_size=4)


@pytest.mark.timeout(30)
def test_forward_returns_the_outputs_that_a_declared_schema_describes():
    backend = _backend()
    x = torch.randn(3, 8)
    outputs = backend.forward(x)
    assert len(outputs) == 1 and torch.allclose(outputs[0], backend.module.linear(x).detach())


@pytest.mark.timeout(90)
def test_a_remote_expert_gets_the_described_outputs_of_such_a_module():
    dht = DHT(start=True)
    backend = _backend()
    server = Server(dht, {"block.0": backend}, start=True)
    try:
        server.ready.wait(30)
        client_dht = DHT(initial_peers=dht.get_visible_maddrs(), client_mode=True, start=True)
        try:
            (expert,) = create_remote_experts([ExpertInfo("block.0", dht.peer_id)], client_dht)
            x = torch.randn(2, 8)
            output = expert(x)
            assert isinstance(output, torch.Tensor) and torch.allclose(output, backend.module.linear(x), atol=1e-6)
        finally:
            client_dht.shutdown()
    finally:
        server.shutdown()
        dht.shutdown()
