"""An expert whose outputs schema says pin_memory=True (e.g. a GPU server describing a pinned sample output): the
mixture's buffers for its answers are ordinary CPU tensors, so a client without an accelerator can still use it."""

import pytest
import torch
import torch.nn as nn
from moe_swarm_helpers import serving_experts

from hivemind.moe import ModuleBackend, RemoteMixtureOfExperts
from hivemind.utils.tensor_descr import BatchTensorDescriptor

HIDDEN = 4
UIDS = ["pinned.0", "pinned.1"]


@pytest.mark.timeout(60)
def test_mixture_of_experts_with_a_pinned_outputs_schema_equals_a_local_mixture():
    backends = {}
    for seed, uid in enumerate(UIDS):
        torch.manual_seed(seed)
        backends[uid] = ModuleBackend(
            uid,
            nn.Linear(HIDDEN, HIDDEN),
            args_schema=(BatchTensorDescriptor(HIDDEN),),
            outputs_schema=BatchTensorDescriptor(HIDDEN, dtype=torch.float32, pin_memory=True),
            max_batch_size=16,
        )
    with serving_experts(backends) as (_, client_dht):
        moe = RemoteMixtureOfExperts(
            in_features=HIDDEN, grid_size=(2,), dht=client_dht, uid_prefix="pinned.", k_best=2
        )
        inputs = torch.randn(3, HIDDEN)

        output = moe(inputs)

        with torch.no_grad():
            weights = torch.softmax(moe.proj(inputs), dim=-1)
            local = [backends[uid].module(inputs) for uid in UIDS]
        assert torch.allclose(output, weights[:, :1] * local[0] + weights[:, 1:] * local[1], atol=1e-5)
