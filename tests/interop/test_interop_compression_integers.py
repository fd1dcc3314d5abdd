"""Integer tensors that our lossy codecs send uncompressed decode exactly in the original implementation."""

import io

import pytest
import torch

from hivemind.proto import runtime_pb2

from .conftest import ORIGINAL, OURS

pytestmark = [pytest.mark.interop, pytest.mark.timeout(60)]


@pytest.fixture(scope="module")
def tensor_peers(module_peers):
    return {side: module_peers(side, f"int-tensor-{side}") for side in (ORIGINAL, OURS)}


def _save(tensor: torch.Tensor) -> str:
    buffer = io.BytesIO()
    torch.save(tensor, buffer)
    return buffer.getvalue().hex()


@pytest.mark.parametrize("codec", ["FLOAT16", "MEANSTD_16BIT", "UNIFORM_8BIT", "QUANTILE_8BIT", "BLOCKWISE_8BIT"])
def test_integer_tensor_sent_with_a_lossy_codec_decodes_exactly_in_the_original(tensor_peers, codec):
    tensor = torch.tensor([[0, -5, 2**40], [7, 2**62, -(2**50)]], dtype=torch.int64)
    message_hex = tensor_peers[OURS].call("tensor_serialize", tensor_hex=_save(tensor), compression=codec)
    assert runtime_pb2.Tensor.FromString(bytes.fromhex(message_hex)).compression == runtime_pb2.CompressionType.NONE
    decoded_hex = tensor_peers[ORIGINAL].call("tensor_deserialize", message_hex=message_hex)
    decoded = torch.load(io.BytesIO(bytes.fromhex(decoded_hex)))
    assert decoded.dtype == torch.int64 and torch.equal(decoded, tensor)
