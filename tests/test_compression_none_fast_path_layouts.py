"""NONE's short path: layouts its own tests leave out still give C-order bytes and round trip."""

import pytest
import torch
from compression_helpers import c_order_bytes

from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.proto.runtime_pb2 import CompressionType


def _layouts():
    base = torch.randn(4, 6, 5) * 40
    yield "zero-dim", base[0, 0, 0].clone()
    yield "zero-size", torch.empty(0, 3)
    yield "zero-size slice", base[:, :0]
    yield "expanded (stride 0)", base[0, 0, :1].expand(7, 5)
    yield "overlapping as_strided", torch.as_strided(base, (3, 3), (1, 2), 3)
    yield "permuted with offset", base[1:, 2:, 1:4].permute(2, 0, 1)
    yield "channels_last", base.unsqueeze(0).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        yield "inference tensor", base.clone()


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64, torch.int32, torch.uint8])
def test_none_writes_c_order_bytes_of_unusual_layouts(dtype):
    for name, tensor in _layouts():
        tensor = tensor.to(dtype)
        message = serialize_torch_tensor(tensor, CompressionType.NONE)
        assert message.buffer == c_order_bytes(tensor), name
        assert list(message.size) == list(tensor.shape), name
        assert torch.equal(deserialize_torch_tensor(message), tensor), name


def test_none_keeps_requires_grad_of_a_parameter_and_of_a_non_leaf():
    parameter = torch.nn.Parameter(torch.randn(3, 2))
    for tensor in (parameter, parameter * 2):
        message = serialize_torch_tensor(tensor, CompressionType.NONE)
        assert message.requires_grad and message.buffer == c_order_bytes(tensor)
        restored = deserialize_torch_tensor(message)
        assert restored.requires_grad and torch.equal(restored.detach(), tensor.detach())


def test_none_refuses_a_sparse_tensor_with_a_clear_error():
    with pytest.raises(TypeError, match="expects a dense tensor.*to_dense"):
        serialize_torch_tensor(torch.randn(3, 3).to_sparse(), CompressionType.NONE)
