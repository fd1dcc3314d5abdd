"""One expert uid served by two servers: a failure of one server does not make the mixture skip the other."""

import pytest
import torch
import torch.nn as nn

from hivemind.dht import DHT
from hivemind.moe import ModuleBackend, RemoteMixtureOfExperts, Server, declare_experts
from hivemind.utils import get_dht_time
from hivemind.utils.tensor_descr import BatchTensorDescriptor

HID = 4


class Broken(nn.Linear):
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("this replica is broken")


def start_server(module: nn.Module, initial_peers=()) -> Server:
    schema = dict(args_schema=(BatchTensorDescriptor(HID),), outputs_schema=BatchTensorDescriptor(HID))
    backend = ModuleBackend("dup.0", module, max_batch_size=64, **schema)
    dht = DHT(start=True, initial_peers=list(initial_peers), host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    return Server(dht, {"dup.0": backend}, start=True)


@pytest.mark.timeout(60)
def test_uid_that_failed_on_one_server_is_still_called_on_the_server_that_now_announces_it():
    torch.manual_seed(0)
    broken = start_server(Broken(HID, HID))
    healthy_module = nn.Linear(HID, HID)
    healthy = start_server(healthy_module, broken.dht.get_visible_maddrs())
    # every lookup goes to the network (no cache), so that the client sees whichever announcement is the newest
    client_dht = DHT(start=True, initial_peers=broken.dht.get_visible_maddrs(), client_mode=True, cache_locally=False)
    try:
        moe = RemoteMixtureOfExperts(
            in_features=HID,
            grid_size=(1,),
            dht=client_dht,
            uid_prefix="dup.",
            k_best=1,
            k_min=0,
            allow_zero_outputs=True,
        )
        declare_experts(broken.dht, ["dup.0"], get_dht_time() + 600)  # outlives the servers' own announcements
        x = torch.randn(3, HID)
        assert torch.equal(moe(x), torch.zeros(3, HID))  # the broken replica answered: masked
        assert moe.failure_penalty.is_penalized("dup.0")

        declare_experts(healthy.dht, ["dup.0"], get_dht_time() + 1200)  # now the healthy one holds the uid
        with torch.no_grad():
            assert torch.allclose(moe(x), healthy_module(x), atol=1e-6)  # it was skipped as the same uid
    finally:
        client_dht.shutdown()
        healthy.shutdown()
        broken.shutdown()
