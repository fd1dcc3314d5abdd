"""QUANTILE_8BIT on tensors of at most 256 elements: every value is a bin boundary, so each distinct value gets its
own bin and the tensor decodes exactly, as in the original (a mixed averaging group's small tensors, e.g. biases,
stay exact). Larger tensors keep approximate bins."""

import pytest
import torch

from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.proto.runtime_pb2 import CompressionType


@pytest.mark.parametrize("numel", [2, 12, 200, 256])
def test_quantile_8bit_round_trips_small_tensors_exactly(numel):
    tensor = torch.randn(numel, generator=torch.Generator().manual_seed(numel))
    decoded = deserialize_torch_tensor(serialize_torch_tensor(tensor, CompressionType.QUANTILE_8BIT))
    assert torch.equal(decoded, tensor)


def test_quantile_8bit_keeps_the_bins_of_values_equal_to_a_boundary():
    # 1000 elements of 7 distinct values: every value is a boundary and must decode to itself
    values = torch.tensor([-3.0, -1.25, 0.0, 0.5, 2.0, 7.5, 100.0])
    tensor = values[torch.randint(0, 7, (1000,), generator=torch.Generator().manual_seed(0))]
    decoded = deserialize_torch_tensor(serialize_torch_tensor(tensor, CompressionType.QUANTILE_8BIT))
    assert torch.equal(decoded, tensor)
