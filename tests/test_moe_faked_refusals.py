"""A mixture does not penalize an expert whose server refuses its request as invalid (the caller's fault, see
test_moe_refused_requests.py), but any server can answer with a refusal's text: a hostile one that refused every
request so was never penalized, and kept its place among each sample's chosen experts, masked at every step. A
refusal is now believed only where it can be the caller's fault: the rows sent hold a NaN or infinite value, or no
other expert of the call took its own rows."""

import pytest
import torch
import torch.nn as nn
from moe_client_fakes import FakeExpertServer

from hivemind.dht import DHT
from hivemind.moe import RemoteMixtureOfExperts
from hivemind.moe.client.call_many import refusal_is_credible

HID = 4


def test_a_refusal_is_credible_for_non_finite_rows_or_when_no_other_expert_took_its_rows():
    finite, with_nan = [torch.randn(3, HID)], [torch.tensor([[0.0, float("nan"), 0.0, 0.0]])]
    assert not refusal_is_credible(finite, others_accepted=True)
    assert refusal_is_credible(finite, others_accepted=False)
    assert refusal_is_credible(with_nan, others_accepted=True)
    assert refusal_is_credible([torch.randn(3, HID), torch.full((3, 1), float("inf"))], others_accepted=True)
    assert not refusal_is_credible([torch.randn(3, HID), torch.ones(3, dtype=torch.int64)], others_accepted=True)


@pytest.mark.timeout(90)
def test_an_expert_refusing_finite_rows_that_the_others_take_is_penalized():
    honest = FakeExpertServer({"ffn.1": nn.Linear(HID, HID), "ffn.2": nn.Linear(HID, HID)}, HID)
    liar = FakeExpertServer({"ffn.0": nn.Linear(HID, HID)}, HID, initial_peers=honest.dht.get_visible_maddrs())
    liar.handler.refusing.add("ffn.0")
    client_dht = DHT(start=True, initial_peers=honest.dht.get_visible_maddrs(), host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    try:
        moe = RemoteMixtureOfExperts(in_features=HID, grid_size=(3,), dht=client_dht, uid_prefix="ffn.", k_best=3)
        inputs = torch.randn(5, HID)
        with torch.no_grad():
            weights = torch.softmax(moe.proj(inputs)[:, 1:], dim=-1)  # ffn.1 and ffn.2 answer
            expected = sum(weights[:, [i]] * honest.handler.modules[f"ffn.{i + 1}"](inputs) for i in range(2))
        assert torch.allclose(moe(inputs), expected, atol=1e-5)
        assert liar.handler.calls["forward:ffn.0"] == [5]
        # (before, it was believed: never penalized, so called, and masked, at every step)
        assert moe.failure_penalty.is_penalized(("ffn.0", liar.dht.peer_id))
        assert not moe.failure_penalty.is_penalized(("ffn.1", honest.dht.peer_id))
    finally:
        client_dht.shutdown()
        liar.stop()
        honest.stop()
