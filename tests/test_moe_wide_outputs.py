"""Experts whose answer is far larger than their request: a unary answer travels in one message of at most 4 MiB, so
such a forward must be asked for by streaming even though its inputs are small."""

import pytest
import torch
import torch.nn as nn
from moe_swarm_helpers import serving_experts

from hivemind.moe import RemoteExpert, RemoteMixtureOfExperts
from hivemind.moe.client.expert_rpc import MAX_UNARY_PAYLOAD_SIZE
from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker
from hivemind.moe.expert_uid import ExpertInfo
from hivemind.moe.server.module_backend import ModuleBackend
from hivemind.utils.tensor_descr import BatchTensorDescriptor

IN_FEATURES, OUT_FEATURES = 4, 8192
BATCH = 160  # 2.5 KiB of inputs, 5 MiB of outputs
UIDS = ["wide.0", "wide.1"]


@pytest.fixture(scope="module")
def wide_swarm():
    """(server, client DHT): a Server of two experts that widen 4 features to 8192."""
    backends = {}
    for seed, uid in enumerate(UIDS):
        torch.manual_seed(seed)
        backends[uid] = ModuleBackend(
            uid,
            nn.Linear(IN_FEATURES, OUT_FEATURES),
            args_schema=(BatchTensorDescriptor(IN_FEATURES),),
            outputs_schema=BatchTensorDescriptor(OUT_FEATURES),
            max_batch_size=BATCH,
        )
    with serving_experts(backends, update_period=10) as (server, client_dht):
        yield server, client_dht


def test_the_case_has_a_small_request_and_an_answer_over_the_unary_limit():
    assert BATCH * IN_FEATURES * 4 < MAX_UNARY_PAYLOAD_SIZE < 4 * 1024**2 < BATCH * OUT_FEATURES * 4


@pytest.mark.timeout(60)
def test_remote_expert_with_an_answer_over_one_message_equals_the_local_module(wide_swarm):
    server, client_dht = wide_swarm
    p2p = RemoteExpertWorker.run_coroutine(client_dht.replicate_p2p())
    expert = RemoteExpert(ExpertInfo("wide.0", server.dht.peer_id), p2p)
    inputs = torch.randn(BATCH, IN_FEATURES, requires_grad=True)
    local_inputs = inputs.detach().clone().requires_grad_(True)

    output = expert(inputs)
    output.sum().backward()
    local_output = server.module_backends["wide.0"].module(local_inputs)
    local_output.sum().backward()

    assert torch.allclose(output, local_output, atol=1e-5)
    assert torch.allclose(inputs.grad, local_inputs.grad, atol=1e-4)


@pytest.mark.timeout(60)
def test_mixture_with_answers_over_one_message_equals_a_local_mixture(wide_swarm):
    server, client_dht = wide_swarm
    modules = {uid: backend.module for uid, backend in server.module_backends.items()}
    moe = RemoteMixtureOfExperts(
        in_features=IN_FEATURES, grid_size=(2,), dht=client_dht, uid_prefix="wide.", k_best=2, forward_timeout=30
    )
    inputs = torch.randn(BATCH, IN_FEATURES)

    output = moe(inputs)  # each expert gets every row: 5 MiB of outputs per call

    with torch.no_grad():
        weights = torch.softmax(moe.proj(inputs), dim=-1)
        expected = weights[:, :1] * modules["wide.0"](inputs) + weights[:, 1:] * modules["wide.1"](inputs)
    assert torch.allclose(output, expected, atol=1e-5)
