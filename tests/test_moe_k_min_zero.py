"""timeout_after_k_min with k_min=0 (RemoteSwitchMixtureOfExperts' default), over real daemons."""

import time

import pytest
import torch
import torch.nn as nn
from moe_client_fakes import FakeExpertServer

from hivemind.dht import DHT
from hivemind.moe import RemoteMixtureOfExperts

HID = 4


@pytest.mark.timeout(40)
def test_with_k_min_zero_slow_experts_are_waited_for_at_most_timeout_after_k_min():
    server = FakeExpertServer({"ffn.0": nn.Linear(HID, HID), "ffn.1": nn.Linear(HID, HID)}, HID)
    client_dht = DHT(start=True, initial_peers=server.dht.get_visible_maddrs(), host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    try:
        moe = RemoteMixtureOfExperts(
            in_features=HID,
            grid_size=(2,),
            dht=client_dht,
            uid_prefix="ffn.",
            k_best=2,
            k_min=0,
            timeout_after_k_min=0.5,
            allow_zero_outputs=True,
        )
        moe(torch.randn(2, HID))  # fetches the experts' info
        server.handler.delays.update({"ffn.0": 20, "ffn.1": 20})
        started = time.monotonic()
        output = moe(torch.randn(3, HID))
        # every sample has its k_min=0 answers at once: the wait for the rest ends after 0.5 s, not at the first answer
        assert time.monotonic() - started < 5
        assert torch.equal(output, torch.zeros(3, HID))
    finally:
        client_dht.shutdown()
        server.stop()
