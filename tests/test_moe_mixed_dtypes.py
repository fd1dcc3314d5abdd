"""The mixture of expert outputs that are not of the gating's dtype (integer counts, half-precision values) is their
softmax-weighted sum in the promoted dtype, as torch computes ``weights * outputs``: weights are never rounded to
the outputs' dtype (integer weights are 0, so integer outputs mixed to all zeros)."""

import pytest
import torch
import torch.nn as nn
from moe_swarm_helpers import serving_experts

from hivemind.moe import ModuleBackend, RemoteMixtureOfExperts
from hivemind.moe.client.gating import mix_expert_outputs
from hivemind.utils.tensor_descr import BatchTensorDescriptor

HIDDEN = 4
UIDS = ["count.0", "count.1"]


def test_integer_outputs_mix_to_their_weighted_sum():
    weights = torch.tensor([[0.25, 0.75], [1.0, 0.0]])
    stacked = torch.tensor([[[4], [8]], [[3], [5]]])
    mixed = mix_expert_outputs(weights, stacked)
    assert mixed.dtype == torch.float32
    assert torch.equal(mixed, torch.tensor([[7.0], [3.0]]))


def test_half_precision_outputs_mix_with_full_precision_weights():
    weights = torch.tensor([[1 / 3, 2 / 3]])
    stacked = torch.tensor([[[0.1, 3.0], [0.2, -1.0]]], dtype=torch.float16)
    mixed = mix_expert_outputs(weights, stacked)
    assert mixed.dtype == torch.float32
    assert torch.allclose(mixed, (weights[..., None] * stacked.float()).sum(dim=1))


class CountingExpert(nn.Module):
    """A projection, and how many positions of each example its mask keeps (an integer output)."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(HIDDEN, HIDDEN)

    def forward(self, x: torch.Tensor, mask: torch.Tensor):
        return self.linear(x), mask.sum(dim=-1, keepdim=True)


@pytest.fixture(scope="module")
def counting_swarm():
    """(server backends, a mixture of two CountingExperts over a client DHT)."""
    backends = {}
    for seed, uid in enumerate(UIDS):
        torch.manual_seed(seed)
        descriptors = (BatchTensorDescriptor(HIDDEN), BatchTensorDescriptor(HIDDEN, dtype=torch.int64))
        backends[uid] = ModuleBackend(uid, CountingExpert(), args_schema=descriptors, max_batch_size=16)
    with serving_experts(backends) as (_, client_dht):
        moe = RemoteMixtureOfExperts(in_features=HIDDEN, grid_size=(2,), dht=client_dht, uid_prefix="count.", k_best=2)
        yield backends, moe


MASK = torch.tensor([[1, 0, 1, 1], [0, 0, 0, 1], [1, 1, 1, 1]])


@pytest.mark.timeout(60)
def test_mixture_of_an_integer_output_equals_the_local_weighted_sum(counting_swarm):
    backends, moe = counting_swarm
    inputs = torch.randn(3, HIDDEN)

    projection, counts = moe(inputs, MASK)

    with torch.no_grad():
        weights = torch.softmax(moe.proj(inputs), dim=-1)
        local = [backends[uid].module(inputs, MASK) for uid in UIDS]
    expected_projection = weights[:, :1] * local[0][0] + weights[:, 1:] * local[1][0]
    assert torch.allclose(projection, expected_projection, atol=1e-5)
    assert counts.dtype == torch.float32
    assert torch.allclose(counts, torch.tensor([[3.0], [1.0], [4.0]]), atol=1e-5)  # both experts count alike


@pytest.mark.timeout(60)
def test_mixture_of_an_empty_batch_has_the_dtypes_of_a_full_one(counting_swarm):
    _, moe = counting_swarm
    full = moe(torch.randn(3, HIDDEN), MASK)
    empty = moe(torch.randn(0, HIDDEN), MASK[:0])
    assert [tensor.dtype for tensor in empty] == [tensor.dtype for tensor in full]
    assert [tensor.shape[1:] for tensor in empty] == [tensor.shape[1:] for tensor in full]
