"""The first forward of a mixture whose best-ranked expert sits on a frozen server (its process stopped: the
connection stays open and nothing answers), over real daemons."""

import time

import pytest
import torch
import torch.nn as nn
from moe_client_fakes import FakeExpertServer

from hivemind.dht import DHT
from hivemind.moe import RemoteMixtureOfExperts
from tests.freeze import freeze_tree, thaw_tree

HID = 4


@pytest.mark.timeout(60)
def test_expert_info_comes_from_an_alive_expert_when_the_best_ranked_one_is_frozen():
    torch.manual_seed(0)
    frozen = FakeExpertServer({"ffn.0": nn.Linear(HID, HID)}, HID)
    alive_module = nn.Linear(HID, HID)
    alive = FakeExpertServer({"ffn.1": alive_module}, HID, frozen.dht.get_visible_maddrs())
    client_dht = DHT(start=True, initial_peers=alive.dht.get_visible_maddrs(), host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    stopped = False
    try:
        moe = RemoteMixtureOfExperts(
            in_features=HID, grid_size=(2,), dht=client_dht, uid_prefix="ffn.", k_best=2, forward_timeout=4
        )
        with torch.no_grad():
            moe.proj.weight.zero_(), moe.proj.bias.copy_(torch.tensor([5.0, 0.0]))  # ffn.0 ranks first
        found = moe.beam_search.find_best_experts([[5.0, 0.0]], beam_size=2)  # later searches use the DHT's cache
        assert [expert.uid for expert in found] == ["ffn.0", "ffn.1"]
        stopped = True
        freeze_tree(frozen.dht.pid)

        x = torch.randn(3, HID)
        started = time.monotonic()
        output = moe(x)  # the info request to ffn.0 took the whole forward_timeout: TimeoutError
        assert time.monotonic() - started < 6
        with torch.no_grad():
            assert torch.allclose(output, alive_module(x), atol=1e-6)  # ffn.0 did not answer in time: masked
        assert moe.failure_penalty.is_penalized("ffn.0")
    finally:
        if stopped:
            thaw_tree(frozen.dht.pid)
        client_dht.shutdown()
        alive.stop()
        frozen.stop()
