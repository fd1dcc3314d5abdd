"""Beam search over grids under a uid prefix that already has coordinates (``sub.2.``), and the RemoteExperts it
returns for a batch, against a real expert server."""

import pytest
import torch
import torch.nn as nn
from moe_swarm_helpers import serving_experts

from hivemind.moe import ModuleBackend, RemoteMixtureOfExperts
from hivemind.moe.client.beam_search import MoEBeamSearcher
from hivemind.utils.tensor_descr import BatchTensorDescriptor

HID = 4
UIDS = ["sub.2.0.4.0", "sub.2.1.1.2", "row.1.0", "row.1.1", "row.1.2", "ffn.0.0", "ffn.0.1", "ffn.1.0"]


@pytest.fixture(scope="module")
def swarm():
    torch.manual_seed(0)
    backends = {
        uid: ModuleBackend(uid, nn.Linear(HID, HID), args_schema=(BatchTensorDescriptor(HID),), max_batch_size=64)
        for uid in UIDS
    }
    with serving_experts(backends) as (server, client_dht):
        yield server, client_dht


@pytest.mark.timeout(30)
def test_sub_grid_search_accepts_every_coordinate_below_each_dimensions_size(swarm):
    _, client_dht = swarm
    searcher = MoEBeamSearcher(client_dht, "sub.2.", (2, 5, 3))
    found = searcher.find_best_experts([[0.0] * 2, [0.0] * 5, [0.0] * 3], beam_size=4)
    # coordinate 4 of the second dimension was checked against the third dimension's size (3) and dropped
    assert sorted(expert.uid for expert in found) == ["sub.2.0.4.0", "sub.2.1.1.2"]


@pytest.mark.timeout(30)
def test_one_dimensional_grid_under_a_prefix_with_a_coordinate_finds_its_experts_best_first(swarm):
    _, client_dht = swarm
    searcher = MoEBeamSearcher(client_dht, "row.1.", (4,))
    found = searcher.find_best_experts([[0.5, 2.0, 1.0, 9.0]], beam_size=2)
    assert [expert.uid for expert in found] == ["row.1.1", "row.1.2"]


@pytest.mark.timeout(30)
def test_mixture_over_a_one_dimensional_sub_grid_equals_the_local_mixture(swarm):
    server, client_dht = swarm
    moe = RemoteMixtureOfExperts(in_features=HID, grid_size=(3,), dht=client_dht, uid_prefix="row.1.", k_best=3)
    x = torch.randn(2, HID)
    output = moe(x)
    weights = torch.softmax(moe.proj(x), dim=-1)
    local = [server.module_backends[f"row.1.{index}"].module for index in range(3)]
    expected = sum(weights[:, index : index + 1] * module(x) for index, module in enumerate(local))
    assert torch.allclose(output, expected, atol=1e-5)


@pytest.mark.timeout(30)
def test_samples_of_a_batch_share_one_remote_expert_per_expert(swarm):
    _, client_dht = swarm
    searcher = MoEBeamSearcher(client_dht, "ffn.", (2, 2))
    scores = torch.zeros(50, 2).numpy()
    batch = searcher.batch_find_best_experts([scores, scores], beam_size=3)
    assert all(len(row) == 3 for row in batch)
    # one torch module per distinct expert, not one per (sample, expert): big batches spent seconds creating them
    assert len({id(expert) for row in batch for expert in row}) == 3


@pytest.mark.timeout(30)
def test_each_sample_of_a_large_batch_gets_its_own_best_experts_in_order(swarm):
    _, client_dht = swarm
    searcher = MoEBeamSearcher(client_dht, "ffn.", (2, 2))
    torch.manual_seed(1)
    scores = [torch.randn(1000, 2), torch.randn(1000, 2)]  # tensors are accepted as well as arrays
    batch = searcher.batch_find_best_experts(scores, beam_size=2)
    alive = ["ffn.0.0", "ffn.0.1", "ffn.1.0"]
    for row, experts in enumerate(batch):
        total = {uid: float(scores[0][row, int(uid[4])] + scores[1][row, int(uid[6])]) for uid in alive}
        assert [expert.uid for expert in experts] == sorted(alive, key=total.get, reverse=True)[:2]
