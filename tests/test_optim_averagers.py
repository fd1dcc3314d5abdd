"""GradientAverager and the legacy TrainingAverager between two real peers."""

import pytest
import torch
from optim_swarm_helpers import assert_rank_one_gradients_averaged, dht_pair, parameter_averagers

from hivemind.optim.grad_averager import GradientAverager
from hivemind.optim.power_sgd_averager import PowerSGDGradientAverager

__all__ = ["dht_pair"]  # the fixture, used by the tests below

AVERAGER_OPTS = dict(min_matchmaking_time=1.0, request_timeout=0.5)


@pytest.mark.timeout(60)
def test_gradient_averager_weighs_each_peer_by_its_accumulated_samples(dht_pair):
    params = [torch.nn.Parameter(torch.zeros(3)) for _ in range(2)]
    averagers = [
        GradientAverager([param], dht=dht, prefix="grads", start=True, **AVERAGER_OPTS)
        for param, dht in zip(params, dht_pair)
    ]
    try:
        for _ in range(3):  # the first peer: 3 steps of 4 samples with gradient 1
            params[0].grad = torch.ones(3)
            averagers[0].accumulate_grads_(batch_size=4)
        params[1].grad = torch.full((3,), 5.0)  # the second: one step of 4 samples with gradient 5
        averagers[1].accumulate_grads_(batch_size=4)

        controls = [averager.step(wait=False, timeout=10) for averager in averagers]
        for control in controls:
            assert len(control.result(20)) == 2
        expected = torch.full((3,), (12 * 1.0 + 4 * 5.0) / 16)
        for param, averager in zip(params, averagers):
            with averager.use_averaged_gradients():
                assert torch.allclose(param.grad, expected)
            assert averager.local_samples_accumulated == 0  # reset after loading
    finally:
        for averager in averagers:
            averager.shutdown()


@pytest.mark.timeout(60)
def test_training_averager_averages_parameters_and_shares_its_state(dht_pair):
    params = [torch.nn.Parameter(torch.full((2,), value)) for value in (0.0, 2.0)]
    averagers = parameter_averagers(params, dht_pair, prefix="legacy", start=True, **AVERAGER_OPTS)
    try:
        futures = [averager.step(wait=False, timeout=10) for averager in averagers]
        for future in futures:
            assert len(future.result(20)) == 2
        for param, averager in zip(params, averagers):
            assert torch.allclose(param, torch.ones(2)) and averager.local_step == 1

        with torch.no_grad():
            params[0].fill_(7.0)
        metadata, _ = averagers[1].load_state_from_peers(timeout=10)
        assert metadata["step"] == 1
        assert torch.equal(params[1], torch.full((2,), 7.0))
    finally:
        for averager in averagers:
            averager.shutdown()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("rank", [1, 3], ids=["rank-1", "rank-above-the-gradients"])
def test_power_sgd_averages_low_rank_gradients_exactly_and_plain_tensors_as_usual(dht_pair, rank):
    torch.manual_seed(0)
    shared_column = torch.randn(16, 1)
    rows = [torch.randn(1, 12) for _ in range(2)]
    models = [torch.nn.Linear(12, 16) for _ in range(2)]
    averagers = [
        PowerSGDGradientAverager(model.parameters(), rank, dht=dht, prefix=f"psgd{rank}", start=True, **AVERAGER_OPTS)
        for model, dht in zip(models, dht_pair)
    ]
    try:
        assert list(averagers[0]._matrix_shapes) == [0]  # the weight is compressed, the bias is not
        assert_rank_one_gradients_averaged(models, averagers, shared_column, rows, timeout=10)
        sent = sum(t.numel() for t in averagers[0]._ps + averagers[0]._qs)
        assert sent == rank * (16 + 12) and sent < models[0].weight.numel() / 2

        with averagers[0].lock_averaged_tensors, torch.no_grad():
            averagers[0]._qs[0].fill_(5.0)
        _, tensors = averagers[1].load_state_from_peers(timeout=10)
        assert torch.equal(tensors[0], torch.full_like(tensors[0], 5.0))
        assert torch.equal(averagers[1]._qs[0], torch.full_like(tensors[0], 5.0))
    finally:
        for averager in averagers:
            averager.shutdown()
