"""NONE serialization's short path: the same wire bytes as the general one, without per-call extras."""

import pytest
import torch
from compression_helpers import c_order_bytes

import hivemind.compression.serialization as serialization
from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.compression.base import CompressionInfo
from hivemind.proto.runtime_pb2 import CompressionType

DTYPES = [
    torch.float16,
    torch.float32,
    torch.float64,
    torch.complex64,
    torch.int8,
    torch.int64,
    torch.uint8,
    torch.bool,
]


def _views(dtype):
    base = (torch.randn(6, 8) * 50).to(dtype) if dtype != torch.bool else torch.randn(6, 8) > 0
    yield "contiguous", base
    yield "transposed", base.t()
    yield "sliced", base[1::2, ::3]
    if dtype.is_complex:
        yield "conjugate view", base.conj()
    if dtype.is_floating_point or dtype.is_complex:
        yield "negative view", torch._neg_view(base)


@pytest.mark.parametrize("dtype", DTYPES)
def test_none_writes_c_order_bytes_of_every_view(dtype):
    for name, tensor in _views(dtype):
        message = serialize_torch_tensor(tensor, CompressionType.NONE)
        assert message.buffer == c_order_bytes(tensor), name
        assert list(message.size) == list(tensor.shape)
        assert torch.equal(deserialize_torch_tensor(message), tensor.resolve_conj().resolve_neg()), name


def test_none_does_not_build_compression_info(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("NONE ignores CompressionInfo: building one costs microseconds per tensor")

    monkeypatch.setattr(serialization.CompressionInfo, "from_tensor", refuse)
    message = serialize_torch_tensor(torch.ones(3), CompressionType.NONE)
    assert deserialize_torch_tensor(message).tolist() == [1.0, 1.0, 1.0]


def test_none_still_checks_compression_info_keywords():
    with pytest.raises(TypeError):
        serialize_torch_tensor(torch.ones(3), CompressionType.NONE, no_such_field=1)
    info = CompressionInfo.from_tensor(torch.ones(3), key="x")
    assert serialize_torch_tensor(torch.ones(3), CompressionType.NONE, info=info).buffer == c_order_bytes(
        torch.ones(3)
    )
