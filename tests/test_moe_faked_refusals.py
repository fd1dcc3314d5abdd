"""A mixture does not penalize an expert whose server refuses its request as invalid (the caller's fault, see
test_moe_refused_requests.py), but any server can answer with a refusal's text: a hostile one that refused every
request so was never penalized, and kept its place among each sample's chosen experts, masked at every step. A
refusal is now believed only where it can be the caller's fault: the rows sent hold a NaN or infinite value, or no
other expert of the call took as many rows (an honest server refuses more rows than its max_batch_size)."""

import pytest
import torch
import torch.nn as nn
from moe_client_fakes import FakeExpertServer
from moe_swarm_helpers import serving_experts

from hivemind.dht import DHT
from hivemind.moe import ModuleBackend, RemoteMixtureOfExperts
from hivemind.moe.client.call_many import refusal_is_credible, refusal_reason
from hivemind.p2p import P2PHandlerError
from hivemind.utils.tensor_descr import BatchTensorDescriptor

HID = 4


def test_a_refusal_is_credible_for_non_finite_rows_or_more_rows_than_any_other_expert_took():
    finite, with_nan = [torch.randn(3, HID)], [torch.tensor([[0.0, float("nan"), 0.0, 0.0]])]
    assert not refusal_is_credible(finite, most_rows_taken=3)
    assert not refusal_is_credible(finite, most_rows_taken=5)
    assert refusal_is_credible(finite, most_rows_taken=2)  # (over a max_batch_size that the others may share)
    assert refusal_is_credible(finite, most_rows_taken=0)  # (no other expert took its rows)
    assert refusal_is_credible(with_nan, most_rows_taken=3)
    assert refusal_is_credible([torch.randn(3, HID), torch.full((3, 1), float("inf"))], most_rows_taken=3)
    assert not refusal_is_credible([torch.randn(3, HID), torch.ones(3, dtype=torch.int64)], most_rows_taken=3)


def test_an_original_servers_refusal_is_read_only_for_more_rows_than_the_limit_it_names():
    """1.1.12 refuses more rows than max_batch_size with this text (a ValueError's repr in a unary call, the bare text
    after the stream prefix in a streamed one, as observed); claiming it for fewer rows is not believed."""
    text = "Task size greater than max_batch_size (16), it can't be processed"
    unary, streamed = (
        P2PHandlerError(f'ValueError("{text}")'),
        P2PHandlerError(f"Failed to call handler `ConnectionHandler.rpc_forward_stream` at 12D3KooWabc: {text}"),
    )
    for error in (unary, streamed):
        assert refusal_reason(error, num_rows=17) == text
        assert refusal_reason(error, num_rows=16) is None
    assert refusal_reason(P2PHandlerError(f"RuntimeError('{text}')"), num_rows=17) is None
    assert refusal_reason(P2PHandlerError(f'ValueError("{text}") and more'), num_rows=17) is None
    assert refusal_reason(RuntimeError(f'ValueError("{text}")'), num_rows=17) is None


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


@pytest.mark.timeout(60)
def test_an_expert_sent_more_rows_than_its_max_batch_size_and_the_others_is_believed():
    # the same max_batch_size on every server, but the gating routes 20 rows to ffn.0 and 10 to ffn.1 (k_best=1):
    # before, ffn.0's refusal was taken for a lie (ffn.1 took its rows), so ffn.0 was penalized and the error did not
    # say that it refused the request, nor why
    backends = {
        uid: ModuleBackend(uid, nn.Linear(HID, HID), args_schema=(BatchTensorDescriptor(HID),), max_batch_size=16)
        for uid in ("ffn.0", "ffn.1")
    }
    with serving_experts(backends) as (_, client_dht):
        moe = RemoteMixtureOfExperts(in_features=HID, grid_size=(2,), dht=client_dht, uid_prefix="ffn.", k_best=1)
        with torch.no_grad():  # a sample with a positive first feature goes to ffn.0, the others to ffn.1
            moe.proj.weight.zero_(), moe.proj.bias.zero_()
            moe.proj.weight[:, 0] = torch.tensor([10.0, -10.0])
        inputs = torch.randn(30, HID)
        inputs[:20, 0], inputs[20:, 0] = 1.0, -1.0
        with pytest.raises(
            RuntimeError, match="refused the request as invalid, e.g. ffn.0: .*exceeds max_batch_size=16"
        ):
            moe(inputs)
        assert moe.failure_penalty.num_penalized() == 0
        assert moe(inputs[10:]).shape == (20, HID)  # 10 rows for each
