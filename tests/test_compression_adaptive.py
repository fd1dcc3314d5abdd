"""Adaptive strategies pick the right concrete codec; messages carry the concrete compression type."""

import pytest
import torch

from hivemind.compression import (
    CompressionInfo,
    Float16Compression,
    NoCompression,
    PerTensorCompression,
    RoleAdaptiveCompression,
    ScaledFloat16Compression,
    SizeAdaptiveCompression,
    TensorRole,
    Uniform8BitQuantization,
    deserialize_torch_tensor,
)
from hivemind.proto.runtime_pb2 import CompressionType


def compressed_type(strategy, tensor, **info_kwargs) -> int:
    return strategy.compress(tensor, CompressionInfo.from_tensor(tensor, **info_kwargs)).compression


@pytest.mark.parametrize("numel, expected", [(99, CompressionType.NONE), (100, CompressionType.FLOAT16)])
def test_size_adaptive_switches_at_the_threshold(numel, expected):
    strategy = SizeAdaptiveCompression(threshold=100, less=NoCompression(), greater_equal=Float16Compression())
    assert compressed_type(strategy, torch.randn(numel)) == expected


def test_size_adaptive_ratio_follows_the_chosen_codec():
    strategy = SizeAdaptiveCompression(threshold=100, less=NoCompression(), greater_equal=Uniform8BitQuantization())
    assert strategy.estimate_compression_ratio(CompressionInfo.from_tensor(torch.zeros(10))) == 1.0
    assert strategy.estimate_compression_ratio(CompressionInfo.from_tensor(torch.zeros(1000))) == 0.25


@pytest.mark.parametrize(
    "role, expected",
    [
        (TensorRole.ACTIVATION, CompressionType.FLOAT16),
        (TensorRole.PARAMETER, CompressionType.MEANSTD_16BIT),
        (TensorRole.GRADIENT, CompressionType.UNIFORM_8BIT),
        (TensorRole.OPTIMIZER, CompressionType.NONE),
        (TensorRole.UNSPECIFIED, CompressionType.NONE),
    ],
)
def test_role_adaptive_picks_by_role_and_falls_back_to_default(role, expected):
    strategy = RoleAdaptiveCompression(
        activation=Float16Compression(), parameter=ScaledFloat16Compression(), gradient=Uniform8BitQuantization()
    )
    assert compressed_type(strategy, torch.randn(50), role=role) == expected


def test_role_adaptive_uses_the_given_default():
    strategy = RoleAdaptiveCompression(gradient=NoCompression(), default=Float16Compression())
    assert compressed_type(strategy, torch.randn(5), role=TensorRole.OPTIMIZER) == CompressionType.FLOAT16
    assert compressed_type(strategy, torch.randn(5), role=TensorRole.GRADIENT) == CompressionType.NONE


def test_per_tensor_compression_by_index_and_by_key():
    by_index = PerTensorCompression([NoCompression(), Float16Compression()])
    assert compressed_type(by_index, torch.randn(5), key=1) == CompressionType.FLOAT16
    by_key = PerTensorCompression({"weight": Uniform8BitQuantization(), "bias": NoCompression()})
    assert compressed_type(by_key, torch.randn(5), key="weight") == CompressionType.UNIFORM_8BIT


def test_per_tensor_compression_with_unknown_key_raises_key_error():
    with pytest.raises(KeyError, match="missing"):
        PerTensorCompression({"weight": NoCompression()}).compress(
            torch.zeros(3), CompressionInfo.from_tensor(torch.zeros(3), key="missing")
        )


def test_adaptive_messages_decode_without_the_strategy_object():
    strategy = SizeAdaptiveCompression(threshold=10, less=NoCompression(), greater_equal=Float16Compression())
    tensor = torch.randn(20)
    restored = deserialize_torch_tensor(strategy.compress(tensor, CompressionInfo.from_tensor(tensor)))
    assert torch.allclose(restored, tensor, atol=1e-2)


def test_compression_info_part_keeps_key_descriptor_and_role():
    info = CompressionInfo.from_tensor(torch.zeros(10, 3), key="w", role=TensorRole.GRADIENT)
    part = info.get_part(2, 7)
    assert (part.key, part.descriptor, part.role, part.part_index, part.part_size) == (
        "w",
        info.descriptor,
        TensorRole.GRADIENT,
        2,
        7,
    )
    assert info.descriptor.shape == (10, 3) and info.part_index == 0 and info.part_size is None


def test_tensor_role_values_match_the_spec():
    assert [(role.name, role.value) for role in TensorRole] == [
        ("ACTIVATION", 1),
        ("PARAMETER", 2),
        ("GRADIENT", 3),
        ("OPTIMIZER", 4),
        ("UNSPECIFIED", 5),
    ]
