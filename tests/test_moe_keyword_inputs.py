"""A mixture over experts with keyword inputs takes them by name, or positionally after the positional inputs (in
the order of the flat schema), as hivemind 1.1.12 does; keyword names the experts do not take are refused."""

import time

import pytest
import torch

from hivemind.dht import DHT
from hivemind.moe import RemoteMixtureOfExperts
from hivemind.moe.server.module_backend import ModuleBackend
from hivemind.moe.server.server import Server
from hivemind.utils.tensor_descr import BatchTensorDescriptor

HID = 8


class Scaled(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(HID, HID)

    def forward(self, x, scale=None):
        return self.linear(x) * scale


@pytest.fixture(scope="module")
def mixture():
    server_dht = DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    descriptor = BatchTensorDescriptor(HID)
    backends = {
        f"kw.{i}": ModuleBackend(
            f"kw.{i}",
            Scaled(),
            args_schema=(descriptor,),
            kwargs_schema={"scale": descriptor},
            outputs_schema=descriptor,
            max_batch_size=64,
        )
        for i in range(2)
    }
    server = Server(server_dht, backends, update_period=5, start=True)
    client_dht = DHT(start=True, initial_peers=server_dht.get_visible_maddrs(), host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    try:
        deadline = time.monotonic() + 20
        while client_dht.get("kw.0") is None and time.monotonic() < deadline:
            time.sleep(0.2)
        yield RemoteMixtureOfExperts(dht=client_dht, uid_prefix="kw.", grid_size=(2,), in_features=HID, k_best=2)
    finally:
        client_dht.shutdown()
        server.shutdown()
        server_dht.shutdown()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("by_name", [True, False], ids=["by-name", "positionally"])
def test_keyword_inputs_by_name_or_positionally_give_the_same_output(mixture, by_name):
    torch.manual_seed(0)
    x, scale = torch.randn(4, HID), torch.rand(4, HID, requires_grad=True)
    output = mixture(x, scale=scale) if by_name else mixture(x, scale)
    assert output.shape == (4, HID)
    output.sum().backward()
    assert scale.grad is not None
    torch.manual_seed(0)
    assert torch.allclose(output, mixture(x, scale=scale.detach()), atol=1e-6)


@pytest.mark.timeout(60)
def test_a_keyword_the_experts_do_not_take_is_refused(mixture):
    with pytest.raises(TypeError, match=r"the experts expect keyword arguments \('scale',\), got \('factor',\)"):
        mixture(torch.randn(2, HID), factor=torch.rand(2, HID))
