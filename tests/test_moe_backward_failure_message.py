"""A mixture's backward with too few expert answers says how many of the experts it called failed (or timed out) and
how many it skipped, as forward does: after the experts' server died it said only "Only 0 expert answers arrived in
backward ... (raise backward_timeout or lower backward_k_min)", although no timeout was involved."""

import pytest
import torch
import torch.nn as nn
from moe_client_fakes import FakeExpertServer

from hivemind.dht import DHT
from hivemind.moe import RemoteMixtureOfExperts

HID = 4


@pytest.mark.timeout(60)
def test_backward_after_the_experts_server_died_says_that_they_failed():
    server = FakeExpertServer({"ffn.0": nn.Linear(HID, HID), "ffn.1": nn.Linear(HID, HID)}, HID)
    client_dht = DHT(start=True, initial_peers=server.dht.get_visible_maddrs(), host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    try:
        moe = RemoteMixtureOfExperts(in_features=HID, grid_size=(2,), dht=client_dht, uid_prefix="ffn.", k_best=2)
        outputs = moe(torch.randn(3, HID, requires_grad=True))
        server.stop()
        with pytest.raises(TimeoutError, match="of the 2 experts that answered forward, 2 failed or did not answer"):
            outputs.sum().backward()
    finally:
        client_dht.shutdown()
