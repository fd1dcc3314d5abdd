"""A server of another configuration under the same uid prefix (another hidden size) must not take a mixture down
when its rpc_info answers first: the mixture used the first info it got for every later call, so that every call of
the well-configured experts was refused or masked and every forward failed for as long as the trainer ran. Now an
info that the call's inputs do not fit is replaced by that of another chosen expert that they fit, and the expert
that gave it is penalized; inputs that fit no expert's info are the caller's error (see
test_moe_inputs_against_schema.py)."""

import pytest
import torch
import torch.nn as nn
from moe_client_fakes import FakeExpertServer

from hivemind.dht import DHT
from hivemind.moe import RemoteMixtureOfExperts

HID = 4


@pytest.mark.timeout(60)
def test_an_info_that_the_inputs_do_not_fit_is_replaced_by_one_they_fit():
    good = FakeExpertServer({"ffn.0": nn.Linear(HID, HID)}, HID)
    good.handler.info_delays["ffn.0"] = 1.0  # the misconfigured server's info arrives first
    other = FakeExpertServer(
        {"ffn.1": nn.Linear(2 * HID, 2 * HID)}, 2 * HID, initial_peers=good.dht.get_visible_maddrs()
    )
    client_dht = DHT(start=True, initial_peers=good.dht.get_visible_maddrs(), host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    try:
        moe = RemoteMixtureOfExperts(in_features=HID, grid_size=(2,), dht=client_dht, uid_prefix="ffn.", k_best=2)
        for _ in range(2):
            inputs = torch.randn(3, HID)
            expected = good.handler.modules["ffn.0"](inputs)
            assert torch.allclose(moe(inputs), expected, atol=1e-5)  # the only expert that can serve these inputs
        assert moe.info["forward_schema"][0][0].shape == (None, HID)
        assert moe.failure_penalty.is_penalized("ffn.1") and not moe.failure_penalty.is_penalized("ffn.0")
    finally:
        client_dht.shutdown()
        other.stop()
        good.stop()
