"""A server under a mixture's uid prefix whose rpc_info answers first with another outputs schema (hostile, or of
another configuration) must not take the mixture over: the mixture used the first info it got for every later call,
so the answers of every well-configured expert were masked as malformed (and those experts penalized), and the
mixture returned that one server's outputs, of its shape, for as long as the trainer ran. Now an info that most of
the other experts that answered disagree with is dropped, its provider penalized, and the call made again with the
info of another expert."""

import pytest
import torch
import torch.nn as nn
from moe_client_fakes import FakeExpertServer

from hivemind.dht import DHT
from hivemind.moe import RemoteMixtureOfExperts
from hivemind.utils.tensor_descr import BatchTensorDescriptor

HID = 4


@pytest.mark.timeout(90)
def test_an_outputs_schema_that_the_other_experts_disagree_with_is_replaced():
    honest = FakeExpertServer({"ffn.1": nn.Linear(HID, HID), "ffn.2": nn.Linear(HID, HID)}, HID)
    honest.handler.info_delays.update({"ffn.1": 1.0, "ffn.2": 1.0})  # the liar's info arrives first
    liar = FakeExpertServer({"ffn.0": nn.Linear(HID, 1)}, HID, initial_peers=honest.dht.get_visible_maddrs())
    descriptor = BatchTensorDescriptor(HID, dtype=torch.float32)
    liar.handler.info = dict(
        forward_schema=((descriptor,), {}), outputs_schema=BatchTensorDescriptor(1), keyword_names=()
    )
    client_dht = DHT(start=True, initial_peers=honest.dht.get_visible_maddrs(), host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    try:
        moe = RemoteMixtureOfExperts(in_features=HID, grid_size=(3,), dht=client_dht, uid_prefix="ffn.", k_best=3)
        for _ in range(2):
            inputs = torch.randn(5, HID)
            with torch.no_grad():
                weights = torch.softmax(moe.proj(inputs)[:, 1:], dim=-1)  # ffn.1 and ffn.2 answer
                expected = sum(weights[:, [i]] * honest.handler.modules[f"ffn.{i + 1}"](inputs) for i in range(2))
            output = moe(inputs)
            assert output.shape == (5, HID)
            assert torch.allclose(output, expected, atol=1e-5)
        assert moe.info["outputs_schema"].shape == (None, HID)
        assert moe.failure_penalty.is_penalized(("ffn.0", liar.dht.peer_id))
        assert not moe.failure_penalty.is_penalized(("ffn.1", honest.dht.peer_id))
    finally:
        client_dht.shutdown()
        liar.stop()
        honest.stop()


@pytest.mark.timeout(90)
def test_a_forward_that_only_calls_experts_disputing_the_info_is_not_lost():
    honest = FakeExpertServer({"ffn.1": nn.Linear(HID, HID), "ffn.2": nn.Linear(HID, HID)}, HID)
    honest.handler.info_delays.update({"ffn.1": 1.0, "ffn.2": 1.0})
    liar = FakeExpertServer({"ffn.0": nn.Linear(HID, 1)}, HID, initial_peers=honest.dht.get_visible_maddrs())
    liar.handler.info = dict(
        forward_schema=((BatchTensorDescriptor(HID, dtype=torch.float32),), {}),
        outputs_schema=BatchTensorDescriptor(1),
        keyword_names=(),
    )
    client_dht = DHT(start=True, initial_peers=honest.dht.get_visible_maddrs(), host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    try:
        moe = RemoteMixtureOfExperts(in_features=HID, grid_size=(3,), dht=client_dht, uid_prefix="ffn.", k_best=3)
        assert moe.info["outputs_schema"].shape == (None, 1)  # the liar's info answered first
        with torch.no_grad():
            moe.proj.weight.zero_(), moe.proj.bias.copy_(torch.tensor([-1e9, 0.0, 0.0]))  # ffn.0 is never chosen
        moe.k_best = 2
        inputs = torch.randn(5, HID)
        # (before, no answer fit the info: 'Only 0 expert answers arrived in forward, fewer than k_min=1')
        output = moe(inputs)
        with torch.no_grad():
            expected = sum(0.5 * honest.handler.modules[uid](inputs) for uid in ("ffn.1", "ffn.2"))
        assert torch.allclose(output, expected, atol=1e-5)
        assert moe.info["outputs_schema"].shape == (None, HID)
    finally:
        client_dht.shutdown()
        liar.stop()
        honest.stop()
