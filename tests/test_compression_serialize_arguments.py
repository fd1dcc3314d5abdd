"""serialize_torch_tensor/deserialize_torch_tensor refuse a non-tensor and raw bytes with a TypeError that says
what to pass, instead of "'list' object has no attribute 'device'" / "'bytes' object has no attribute
'compression'"."""

import pytest
import torch

from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.proto import runtime_pb2


@pytest.mark.parametrize("value", [[1.0, 2.0], 3.0, None], ids=["list", "float", "None"])
def test_serialize_refuses_what_is_not_a_tensor(value):
    with pytest.raises(TypeError, match=r"serialize_torch_tensor expects a torch.Tensor.*torch.tensor\("):
        serialize_torch_tensor(value)


def test_deserialize_refuses_raw_bytes_and_says_how_to_parse_them():
    data = serialize_torch_tensor(torch.arange(3.0)).SerializeToString()
    with pytest.raises(TypeError, match=r"runtime_pb2.Tensor.*runtime_pb2.Tensor.FromString\(data\)"):
        deserialize_torch_tensor(data)
    assert deserialize_torch_tensor(runtime_pb2.Tensor.FromString(data)).tolist() == [0.0, 1.0, 2.0]
