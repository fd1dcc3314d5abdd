"""A sparse tensor given to serialize_torch_tensor is refused at once, with every codec, by a TypeError that says to
convert it with to_dense() (as uncompressed serialization already did), not by an error from inside a codec's
arithmetic (a copy_ or reshape 'not implemented for sparse tensors')."""

import pytest
import torch

from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.proto.runtime_pb2 import CompressionType

CODECS = ["NONE", "FLOAT16", "MEANSTD_16BIT", "QUANTILE_8BIT", "UNIFORM_8BIT", "BLOCKWISE_8BIT"]


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("layout", ["sparse_coo", "sparse_csr"])
def test_a_sparse_tensor_is_refused_with_a_hint_to_densify_it(codec, layout):
    dense = torch.tensor([[0.0, 1.5, 0.0], [2.0, 0.0, -3.0]])
    sparse = dense.to_sparse() if layout == "sparse_coo" else dense.to_sparse_csr()
    with pytest.raises(TypeError, match="to_dense"):
        serialize_torch_tensor(sparse, getattr(CompressionType, codec))
    restored = deserialize_torch_tensor(serialize_torch_tensor(sparse.to_dense(), getattr(CompressionType, codec)))
    assert restored.shape == dense.shape and restored.layout == torch.strided
