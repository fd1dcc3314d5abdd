"""Serialized tensors that only the original writes decode in ours as they do in the original.

The original encodes integer and bool tensors with BLOCKWISE_8BIT (e.g. a BatchNorm's num_batches_tracked in a
state shared with ``state_compression=BlockwiseQuantization()``); ours refuses to encode them, but must read them.
"""

from pathlib import Path

import pytest
import torch

from hivemind.compression import deserialize_torch_tensor
from hivemind.proto import runtime_pb2

from .harness import run_original_script

pytestmark = [pytest.mark.interop, pytest.mark.timeout(90)]

DTYPES = ["int64", "int32", "int16", "int8", "uint8", "bool"]
SHAPES = [(), (0,), (7,), (3, 2000)]


def run_original(script: str, directory: Path) -> None:
    run_original_script(script, directory)


def test_integer_and_bool_blockwise_tensors_of_the_original_decode_as_in_the_original(original_env, tmp_path):
    run_original(
        f"""
        import sys, torch
        from hivemind.compression import serialize_torch_tensor, deserialize_torch_tensor
        from hivemind.proto import runtime_pb2
        written = {{}}
        for dtype in {DTYPES!r}:
            for shape in {SHAPES!r}:
                values = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 100
                tensor = values > 0 if dtype == "bool" else values.to(getattr(torch, dtype))
                message = serialize_torch_tensor(tensor, runtime_pb2.CompressionType.BLOCKWISE_8BIT)
                written[dtype, shape] = (message.SerializeToString(), deserialize_torch_tensor(message))
        torch.save(written, sys.argv[1] + "/tensors.pt")
        """,
        tmp_path,
    )
    written = torch.load(tmp_path / "tensors.pt")
    assert len(written) == len(DTYPES) * len(SHAPES)
    for (dtype, shape), (serialized, decoded_by_the_original) in written.items():
        message = runtime_pb2.Tensor()
        message.ParseFromString(serialized)
        assert message.compression == runtime_pb2.CompressionType.BLOCKWISE_8BIT
        decoded = deserialize_torch_tensor(message)
        assert decoded.dtype == decoded_by_the_original.dtype == getattr(torch, dtype), (dtype, shape)
        assert decoded.shape == torch.Size(shape) and torch.equal(decoded, decoded_by_the_original), (dtype, shape)
