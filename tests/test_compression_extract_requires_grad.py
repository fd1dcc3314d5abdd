"""Every concrete codec's extract() restores the requires_grad flag its message carries, as hivemind 1.1.12's codecs
do: code written for it may call codec.extract(message) directly instead of deserialize_torch_tensor."""

import pytest
import torch

from hivemind.compression import (
    BlockwiseQuantization,
    CompressionInfo,
    Float16Compression,
    NoCompression,
    Quantile8BitQuantization,
    ScaledFloat16Compression,
    TensorDecodeError,
    Uniform8BitQuantization,
)

CODECS = [
    NoCompression(),
    Float16Compression(),
    ScaledFloat16Compression(),
    Uniform8BitQuantization(),
    Quantile8BitQuantization(),
    BlockwiseQuantization(),
]


@pytest.mark.parametrize("codec", CODECS, ids=lambda codec: type(codec).__name__)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("requires_grad", [True, False])
def test_extract_restores_the_requires_grad_flag_of_the_message(codec, dtype, requires_grad):
    tensor = torch.randn(4, 300, generator=torch.Generator().manual_seed(7)).to(dtype).requires_grad_(requires_grad)
    message = codec.compress(tensor, CompressionInfo.from_tensor(tensor))
    assert message.requires_grad == requires_grad
    restored = codec.extract(message)
    assert restored.requires_grad == requires_grad and restored.is_leaf
    assert restored.shape == tensor.shape and restored.dtype == dtype


def test_extract_of_a_legacy_bfloat16_message_restores_the_flag():
    tensor = torch.randn(10).to(torch.bfloat16)
    message = NoCompression().compress(tensor.float(), CompressionInfo.from_tensor(tensor))
    message.dtype, message.requires_grad = "bfloat16", True  # float32 values under a bfloat16 name: the old layout
    restored = NoCompression().extract(message)
    assert restored.dtype == torch.bfloat16 and restored.requires_grad
    assert torch.equal(restored.detach(), tensor)


def test_extract_refuses_requires_grad_on_an_integer_tensor():
    message = NoCompression().compress(torch.arange(6), CompressionInfo.from_tensor(torch.arange(6)))
    message.requires_grad = True  # no integer tensor can require grad: a peer's garbage
    with pytest.raises(TensorDecodeError, match="cannot have requires_grad"):
        NoCompression().extract(message)
