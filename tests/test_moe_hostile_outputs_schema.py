"""A server whose experts declare an enormous outputs schema cannot make a mixture allocate for it: the call is
refused with the reason before any request is sent or any answer buffer is allocated."""

import psutil
import pytest
import torch
import torch.nn as nn
from moe_swarm_helpers import serving_experts

from hivemind.moe import ModuleBackend, RemoteMixtureOfExperts
from hivemind.moe.client.expert_rpc import ExpertInfoError
from hivemind.utils.tensor_descr import BatchTensorDescriptor

HIDDEN = 4
UIDS = ["huge.0", "huge.1"]


@pytest.mark.timeout(60)
def test_mixture_refuses_an_outputs_schema_that_would_need_terabytes():
    backends = {
        uid: ModuleBackend(
            uid,
            nn.Linear(HIDDEN, HIDDEN),
            args_schema=(BatchTensorDescriptor(HIDDEN),),
            outputs_schema=BatchTensorDescriptor(2**36),  # 256 GiB per sample, declared by the server
            max_batch_size=16,
        )
        for uid in UIDS
    }
    with serving_experts(backends) as (_, client_dht):
        moe = RemoteMixtureOfExperts(
            in_features=HIDDEN, grid_size=(2,), dht=client_dht, uid_prefix="huge.", k_best=2, allow_zero_outputs=True
        )
        rss_before = psutil.Process().memory_info().rss

        with pytest.raises(ExpertInfoError, match="outputs schema .* bytes of answers for 3 samples x 2 experts"):
            moe(torch.randn(3, HIDDEN))

        assert psutil.Process().memory_info().rss - rss_before < 256 * 2**20
