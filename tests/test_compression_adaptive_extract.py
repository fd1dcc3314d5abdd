"""An adaptive strategy decodes what it (or any codec) encoded, like every other codec: code that holds a
CompressionBase and calls extract() on its messages must not have to know whether the codec is adaptive."""

import pytest
import torch

from hivemind.compression import (
    CompressionInfo,
    Float16Compression,
    NoCompression,
    PerTensorCompression,
    RoleAdaptiveCompression,
    SizeAdaptiveCompression,
    TensorDecodeError,
    TensorRole,
    Uniform8BitQuantization,
)
from hivemind.proto import runtime_pb2

STRATEGIES = {
    "size": SizeAdaptiveCompression(10, less=NoCompression(), greater_equal=Float16Compression()),
    "role": RoleAdaptiveCompression(parameter=Float16Compression(), default=Uniform8BitQuantization()),
    "per-tensor": PerTensorCompression({"weight": Uniform8BitQuantization(), "bias": NoCompression()}),
}


@pytest.mark.parametrize("name", list(STRATEGIES))
@pytest.mark.parametrize("numel, key, role", [(5, "bias", TensorRole.PARAMETER), (300, "weight", TensorRole.GRADIENT)])
def test_adaptive_strategy_extracts_its_own_messages_with_requires_grad(name, numel, key, role):
    strategy = STRATEGIES[name]
    tensor = torch.randn(numel, generator=torch.Generator().manual_seed(numel)).requires_grad_()
    info = CompressionInfo.from_tensor(tensor, key=key, role=role)
    message = strategy.compress(tensor, info)
    concrete = strategy.choose_compression(info)
    restored = strategy.extract(message)
    assert restored.shape == tensor.shape and restored.dtype == tensor.dtype and restored.requires_grad
    torch.testing.assert_close(restored.detach(), concrete.extract(concrete.compress(tensor, info)).detach())


def test_adaptive_extract_refuses_an_unknown_compression_type_as_a_decode_error():
    message = runtime_pb2.Tensor(compression=99, buffer=b"\0" * 8, size=[2], dtype="float32")
    with pytest.raises(TensorDecodeError, match="compression type"):
        STRATEGIES["size"].extract(message)
