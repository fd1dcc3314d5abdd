"""A mixture's request that the experts refuse as invalid (an input with an infinite value, more rows for one expert
than its max_batch_size, NaN output gradients) is the caller's fault, not the experts': it was counted as their
failure and every expert was penalized, so that the forward failed with "Only 0 expert answers arrived ... raise
forward_timeout" and the next, valid, call found every expert skipped and failed too. Now the experts are not
penalized, and a call that every expert refused raises a ValueError with their reason."""

import pytest
import torch
import torch.nn as nn
from moe_swarm_helpers import serving_experts

from hivemind.moe import ModuleBackend, RemoteMixtureOfExperts, RemoteSwitchMixtureOfExperts
from hivemind.utils.tensor_descr import BatchTensorDescriptor

HID = 4
MAX_BATCH = 16


class ScaledLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(HID, HID)

    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return self.linear(x) * scale


@pytest.fixture(scope="module")
def mixture():
    schema = (BatchTensorDescriptor(HID, dtype=torch.float32), BatchTensorDescriptor(1, dtype=torch.float32))
    backends = {
        uid: ModuleBackend(uid, ScaledLinear(), args_schema=schema, max_batch_size=MAX_BATCH)
        for uid in ("ffn.0", "ffn.1")
    }
    with serving_experts(backends) as (_, client_dht):
        yield RemoteMixtureOfExperts(in_features=HID, grid_size=(2,), dht=client_dht, uid_prefix="ffn.", k_best=2)


def scale_with_inf(rows: int = 3) -> torch.Tensor:
    scale = torch.ones(rows, 1)
    scale[1] = float("inf")  # (not an input of the gating: every sample is routed to both experts)
    return scale


def check_still_served(mixture) -> None:
    assert mixture.failure_penalty.num_penalized() == 0
    assert mixture(torch.randn(3, HID), torch.ones(3, 1)).shape == (3, HID)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "inputs, reason",
    [
        ((torch.randn(3, HID), scale_with_inf()), "input #1 contains NaN or infinite values"),
        ((torch.randn(MAX_BATCH + 4, HID), torch.ones(MAX_BATCH + 4, 1)), "exceeds max_batch_size=16"),
    ],
    ids=["inf", "too_many_rows"],
)
def test_a_forward_that_every_expert_refuses_raises_their_reason_and_penalizes_none(mixture, inputs, reason):
    mixture(torch.randn(3, HID), torch.ones(3, 1))
    with pytest.raises(ValueError, match=f"refused the request as invalid.*{reason}"):
        mixture(*inputs)
    check_still_served(mixture)


@pytest.mark.timeout(60)
def test_a_backward_that_every_expert_refuses_raises_their_reason_and_penalizes_none(mixture):
    outputs = mixture(torch.randn(3, HID), torch.ones(3, 1))
    with pytest.raises(ValueError, match="refused the request as invalid.*contains NaN or infinite values"):
        (outputs * float("nan")).sum().backward()
    check_still_served(mixture)


@pytest.mark.timeout(60)
def test_with_k_min_zero_refused_requests_leave_zeros_and_penalize_no_expert(mixture):
    switch = RemoteSwitchMixtureOfExperts(
        in_features=HID, grid_size=(2,), dht=mixture.dht, uid_prefix="ffn.", k_best=2, jitter_eps=0
    )
    inputs = torch.randn(3, HID, requires_grad=True)
    outputs, _ = switch(inputs, scale_with_inf())  # k_min=0, allow_zero_outputs: the caller accepts no answers
    assert torch.equal(outputs, inputs)  # (the input is added to the mixed outputs, zeros here)
    outputs.sum().backward()  # backward_k_min=0: no expert answered forward, so none is called
    assert switch.failure_penalty.num_penalized() == 0


WIDE = 40_000  # 16 rows of this many float32 values: 2.56 MiB, so that the calls are streamed (above 2 MiB)


class WideScaledLinear(ScaledLinear):
    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return self.linear(x) * scale[:, :1]


@pytest.fixture(scope="module")
def wide_mixture():
    schema = (BatchTensorDescriptor(HID, dtype=torch.float32), BatchTensorDescriptor(WIDE, dtype=torch.float32))
    backends = {
        uid: ModuleBackend(uid, WideScaledLinear(), args_schema=schema, max_batch_size=MAX_BATCH)
        for uid in ("ffn.0", "ffn.1")
    }
    with serving_experts(backends) as (_, client_dht):
        yield RemoteMixtureOfExperts(in_features=HID, grid_size=(2,), dht=client_dht, uid_prefix="ffn.", k_best=2)


@pytest.mark.timeout(60)
def test_a_streamed_request_that_every_expert_refuses_raises_their_reason_and_penalizes_none(wide_mixture):
    # (before, a streamed call's error carried the refusal's text without its class name: each refusal counted as a
    # failure, 'Only 0 expert answers arrived', and both experts were penalized)
    scale = torch.ones(MAX_BATCH, WIDE)
    scale[1, 5] = float("nan")
    with pytest.raises(ValueError, match="refused the request as invalid.*input #1 contains NaN or infinite values"):
        wide_mixture(torch.randn(MAX_BATCH, HID), scale)
    assert wide_mixture.failure_penalty.num_penalized() == 0
    outputs = wide_mixture(torch.randn(MAX_BATCH, HID), torch.ones(MAX_BATCH, WIDE))
    with pytest.raises(ValueError, match="refused the request as invalid.*contains NaN or infinite values"):
        (outputs * float("nan")).sum().backward()
    assert wide_mixture.failure_penalty.num_penalized() == 0
