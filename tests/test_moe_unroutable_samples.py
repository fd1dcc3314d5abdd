"""A sample whose gating scores are NaN (its input has NaN values) cannot be routed to any expert. The mixture says
so: it raised "No responding experts found in the DHT ... check that expert servers run" (the whole batch) or "No
expert answered for 1 of 3 samples ... raise k_best" (some samples), both pointing at the servers instead."""

import pytest
import torch
import torch.nn as nn
from moe_client_fakes import FakeExpertServer

from hivemind.dht import DHT
from hivemind.moe import RemoteMixtureOfExperts, RemoteSwitchMixtureOfExperts
from hivemind.moe.client.gating import unroutable_samples

HID = 4


def test_unroutable_samples_have_no_usable_score_in_some_dimension():
    nan, inf = float("nan"), float("inf")
    first = torch.tensor([[0.0, 1.0], [nan, nan], [-inf, 2.0], [0.0, 0.0]])
    second = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [-inf, nan, -inf]])
    assert unroutable_samples([first, second]) == [1, 3]
    assert unroutable_samples([first[:1], second[:1]]) == []


@pytest.fixture(scope="module")
def swarm():
    server = FakeExpertServer({"ffn.0": nn.Linear(HID, HID), "ffn.1": nn.Linear(HID, HID)}, HID)
    client_dht = DHT(start=True, initial_peers=server.dht.get_visible_maddrs(), host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    try:
        yield client_dht
    finally:
        client_dht.shutdown()
        server.stop()


def with_nan_row(rows: int = 3, row: int = 1) -> torch.Tensor:
    inputs = torch.randn(rows, HID)
    inputs[row, 0] = float("nan")
    return inputs


@pytest.mark.timeout(60)
@pytest.mark.parametrize("inputs", [with_nan_row(), torch.full((3, HID), float("nan"))], ids=["one", "all"])
def test_samples_with_nan_gating_scores_are_refused_naming_the_cause(swarm, inputs):
    moe = RemoteMixtureOfExperts(in_features=HID, grid_size=(2,), dht=swarm, uid_prefix="ffn.", k_best=2)
    with pytest.raises(ValueError, match=r"gating scores of \d of 3 samples \(e\.g\. sample [01]\) are NaN"):
        moe(inputs)
    assert moe(torch.randn(3, HID)).shape == (3, HID)  # the mixture and its experts are fine


@pytest.mark.timeout(60)
def test_with_allow_zero_outputs_only_a_batch_that_cannot_be_routed_at_all_is_refused(swarm):
    switch = RemoteSwitchMixtureOfExperts(in_features=HID, grid_size=(2,), dht=swarm, uid_prefix="ffn.")
    outputs, _ = switch(with_nan_row())  # the other samples are routed; the NaN one gets zeros (plus its input)
    assert torch.isfinite(outputs[[0, 2]]).all()
    with pytest.raises(ValueError, match="gating scores of 3 of 3 samples"):
        switch(torch.full((3, HID), float("nan")))
