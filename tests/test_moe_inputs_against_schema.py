"""Inputs that do not fit the experts' schema (another per-example shape or dtype, a missing extra input) are the
caller's mistake: a mixture refuses them before calling any expert, with a ValueError that names the input and the
schema. They were sent to every chosen expert, each refused them, and the mixture reported it as the experts'
failure: "Only 0 expert answers arrived in forward ... raise forward_timeout or lower k_min", with every expert
penalized, so that the next, correct, call found them all skipped and failed as well."""

import pytest
import torch
import torch.nn as nn
from moe_swarm_helpers import serving_experts

from hivemind.moe import ModuleBackend, RemoteMixtureOfExperts
from hivemind.utils.tensor_descr import BatchTensorDescriptor

HID = 4
UIDS = ["ffn.0", "ffn.1"]


class MaskedLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(HID, HID)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.linear(x) * mask


@pytest.fixture(scope="module")
def mixture():
    backends = {}
    for uid in UIDS:
        schema = (BatchTensorDescriptor(HID, dtype=torch.float32), BatchTensorDescriptor(1, dtype=torch.int64))
        backends[uid] = ModuleBackend(uid, MaskedLinear(), args_schema=schema, max_batch_size=16)
    with serving_experts(backends) as (_, client_dht):
        yield RemoteMixtureOfExperts(in_features=HID, grid_size=(2,), dht=client_dht, uid_prefix="ffn.", k_best=2)


MASK = torch.ones(3, 1, dtype=torch.int64)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "inputs, error, match",
    [
        ((torch.randn(3, 5, HID), MASK), ValueError, r"input #0 has shape \[3, 5, 4\], expected \[batch_size, 4\]"),
        ((torch.randn(3, HID), MASK.bool()), ValueError, r"input #1 has dtype torch.bool, expected torch.int64"),
        ((torch.randn(3, HID), MASK[:2]), ValueError, r"input #1 has batch size 2, but input #0 has 3"),
        ((torch.randn(3, HID),), TypeError, r"take 2 input tensors .*, got 1"),
    ],
    ids=["shape", "dtype", "batch", "count"],
)
def test_inputs_that_do_not_fit_the_schema_are_refused_and_no_expert_is_blamed(mixture, inputs, error, match):
    assert mixture(torch.randn(3, HID), MASK).shape == (3, HID)  # (fetches the experts' schema)
    with pytest.raises(error, match=match):
        mixture(*inputs)
    assert mixture.failure_penalty.num_penalized() == 0
    assert mixture(torch.randn(3, HID), MASK).shape == (3, HID)
