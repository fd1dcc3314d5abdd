"""The averaged tensors and CompressionInfos of TrainingStateAverager and TrainingAverager are laid out as the
original library's: peers of both average statistics and extra tensors together (the order is part of the schema
hash), and a PerTensorCompression or RoleAdaptiveCompression written for the original picks the same codecs."""

import pytest
import torch

from hivemind.compression import Float16Compression, NoCompression, PerTensorCompression
from hivemind.dht import DHT
from hivemind.optim.state_averager import TrainingStateAverager
from hivemind.optim.training_averager import TrainingAverager

STATISTICS = ("exp_avg", "exp_avg_sq")
# what the original 1.1.12 gives for a Linear(3, 2) with Adam, these statistics and one extra tensor
ORIGINAL_AVERAGED_INFOS = [
    (0, "PARAMETER"), (1, "PARAMETER"),
    ((0, "exp_avg"), "OPTIMIZER"), ((1, "exp_avg"), "OPTIMIZER"),
    ((0, "exp_avg_sq"), "OPTIMIZER"), ((1, "exp_avg_sq"), "OPTIMIZER"),
    (0, "UNSPECIFIED"),
]  # fmt: skip
# and the schema hash of its TrainingStateAverager (peers average together only if theirs are equal)
ORIGINAL_SCHEMA_HASH = "29c4e2fbe75cca7bb8b67902d739c5ec10d1714a"
ORIGINAL_STATE_INFOS = [(0, "PARAMETER"), (1, "PARAMETER"), (0, "UNSPECIFIED")] + [(i, "OPTIMIZER") for i in range(6)]


def _keys_and_roles(infos):
    return [(info.key, info.role.name) for info in infos]


@pytest.fixture
def dht():
    instance = DHT(start=True)
    yield instance
    instance.shutdown()


@pytest.mark.timeout(60)
def test_state_averager_averages_parameters_then_statistics_then_extra_tensors(dht):
    model, extra = torch.nn.Linear(3, 2), torch.full((4,), 7.0)
    averager = TrainingStateAverager(
        dht=dht, optimizer=lambda params: torch.optim.Adam(params), params=model.parameters(), prefix="infos_tsa",
        start=True, extra_tensors=[extra], average_opt_statistics=STATISTICS,
    )  # fmt: skip
    try:
        statistics = [averager.optimizer.state[p][name] for name in STATISTICS for p in averager.optimizer_parameters]
        expected = [*averager.optimizer_parameters, *statistics, extra]
        with averager.get_tensors() as averaged:
            assert [tuple(t.shape) for t in averaged] == [tuple(t.shape) for t in expected]
            assert all(torch.equal(mine, source) for mine, source in zip(averaged, expected))
        assert averager.schema_hash.hex() == ORIGINAL_SCHEMA_HASH
        assert _keys_and_roles(averager.tensor_infos) == ORIGINAL_AVERAGED_INFOS
        assert _keys_and_roles(averager.get_current_state()[2]) == ORIGINAL_STATE_INFOS
    finally:
        averager.shutdown()


@pytest.mark.timeout(60)
def test_training_averager_numbers_each_kind_of_tensor_from_zero(dht):
    model = torch.nn.Linear(3, 2)
    averager = TrainingAverager(
        torch.optim.Adam(model.parameters()), average_parameters=True, average_gradients=True,
        average_opt_statistics=STATISTICS, extra_tensors=[torch.zeros(4)], dht=dht, prefix="infos_ta", start=True,
    )  # fmt: skip
    try:
        gradients = [(0, "GRADIENT"), (1, "GRADIENT")]
        assert (
            _keys_and_roles(averager.tensor_infos)
            == ORIGINAL_AVERAGED_INFOS[:2] + gradients + ORIGINAL_AVERAGED_INFOS[2:]
        )
        assert _keys_and_roles(averager.get_current_state()[2]) == ORIGINAL_STATE_INFOS
    finally:
        averager.shutdown()


@pytest.mark.timeout(90)
def test_per_tensor_state_compression_written_for_the_original_serves_a_newcomer():
    # one codec per tensor of the largest kind (Adam's six optimizer tensors): enough keys in the original
    state_compression = PerTensorCompression([Float16Compression(), NoCompression()] * 3)
    first = DHT(start=True)
    second = DHT(start=True, initial_peers=first.get_visible_maddrs())
    averagers = []
    try:
        models = [torch.nn.Linear(30, 20) for _ in range(2)]
        for dht, model in zip((first, second), models):
            averagers.append(
                TrainingStateAverager(
                    dht=dht, optimizer=lambda params: torch.optim.Adam(params), params=model.parameters(),
                    prefix="infos_download", start=True, extra_tensors=[torch.zeros(5)],
                    state_compression=state_compression, declare_state_period=1.0,
                )
            )  # fmt: skip
        donor, newcomer = averagers
        donor.local_epoch = 3
        loaded = None
        for _ in range(20):  # until the donor's declaration is visible
            loaded = newcomer.load_state_from_peers(timeout=10)
            if loaded is not None:
                break
        assert loaded is not None, "the donor served no state"
        assert newcomer.local_epoch == 3
        assert torch.equal(models[1].weight, models[0].weight.detach().half().float())  # key 0: Float16Compression
        assert torch.equal(models[1].bias, models[0].bias)  # key 1: NoCompression
    finally:
        for averager in averagers:
            averager.shutdown()
        second.shutdown()
        first.shutdown()
