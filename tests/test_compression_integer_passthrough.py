"""Lossy codecs refuse tensors that are not floating point (the averager sends those uncompressed by itself)."""

import pytest
import torch

from hivemind.compression import (
    BlockwiseQuantization,
    CompressionInfo,
    Float16Compression,
    NoCompression,
    Quantile8BitQuantization,
    RoleAdaptiveCompression,
    ScaledFloat16Compression,
    SizeAdaptiveCompression,
    TensorRole,
    Uniform8BitQuantization,
    serialize_torch_tensor,
)

LOSSY_CODECS = [
    Float16Compression(),
    ScaledFloat16Compression(),
    Uniform8BitQuantization(),
    Quantile8BitQuantization(),
    BlockwiseQuantization(),
]
ADAPTIVE_CODECS = [
    SizeAdaptiveCompression(threshold=1, less=NoCompression(), greater_equal=Uniform8BitQuantization()),
    RoleAdaptiveCompression(default=ScaledFloat16Compression()),
]
NON_FLOATING_TENSORS = {
    "int64": lambda: torch.arange(-(2**40), 2**40, 2**37, dtype=torch.int64).reshape(4, -1),
    "int32": lambda: torch.tensor([[7, -3], [2**31 - 1, -(2**31)]], dtype=torch.int32),
    "uint8": lambda: torch.arange(256, dtype=torch.uint8),
    "bool": lambda: torch.arange(9) % 3 == 0,
    "complex64": lambda: torch.tensor([1 + 2j, -3.5j], dtype=torch.complex64),
    "int64-empty": lambda: torch.zeros(0, 3, dtype=torch.int64),
    "int64-strided": lambda: torch.arange(60).reshape(6, 10)[::2, 1::3],
}


def _codec_id(codec) -> str:
    return repr(codec)


@pytest.mark.parametrize("tensor_name", list(NON_FLOATING_TENSORS))
@pytest.mark.parametrize("codec", LOSSY_CODECS + ADAPTIVE_CODECS, ids=_codec_id)
def test_lossy_codecs_refuse_a_non_floating_tensor_and_say_what_to_use(codec, tensor_name):
    tensor = NON_FLOATING_TENSORS[tensor_name]()
    if isinstance(codec, SizeAdaptiveCompression) and tensor.numel() < 1:
        pytest.skip("below the size threshold: sent with NoCompression")
    with pytest.raises(ValueError, match="floating-point tensors only.*NoCompression"):
        codec.compress(tensor, CompressionInfo.from_tensor(tensor, key=0))


@pytest.mark.parametrize("codec", LOSSY_CODECS, ids=_codec_id)
def test_serialize_torch_tensor_refuses_an_integer_tensor_with_a_lossy_codec(codec):
    with pytest.raises(ValueError, match="float"):
        serialize_torch_tensor(torch.tensor([3, -1, 2**50], dtype=torch.int64), codec.compression_type)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int8, torch.bool, torch.complex128])
@pytest.mark.parametrize("codec", LOSSY_CODECS + ADAPTIVE_CODECS, ids=_codec_id)
def test_compression_ratio_of_a_non_floating_tensor_is_one(codec, dtype):
    info = CompressionInfo.from_tensor(torch.zeros(10, dtype=dtype), key=0, role=TensorRole.GRADIENT)
    assert codec.estimate_compression_ratio(info) == 1.0


@pytest.mark.parametrize("codec", LOSSY_CODECS, ids=_codec_id)
def test_floating_tensors_still_use_the_codec(codec):
    tensor = torch.randn(64, 64)
    message = codec.compress(tensor, CompressionInfo.from_tensor(tensor))
    assert message.compression == codec.compression_type
    assert codec.estimate_compression_ratio(CompressionInfo.from_tensor(tensor)) < 1.0
