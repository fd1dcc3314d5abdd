"""Chunking of serialized tensors for streams and reassembly by deserialize_tensor_stream."""

import pytest
import torch

from hivemind.compression import TensorDecodeError, deserialize_tensor_stream, serialize_torch_tensor
from hivemind.proto import runtime_pb2
from hivemind.proto.runtime_pb2 import CompressionType
from hivemind.utils.streaming import STREAMING_CHUNK_SIZE_BYTES, combine_from_streaming, split_for_streaming


def test_default_chunk_size_is_64_kib():
    assert STREAMING_CHUNK_SIZE_BYTES == 65536


def test_first_chunk_carries_metadata_and_chunk_count_others_only_buffer():
    serialized = serialize_torch_tensor(torch.randn(100, requires_grad=True), CompressionType.FLOAT16)
    chunks = list(split_for_streaming(serialized, chunk_size_bytes=64))
    assert len(chunks) == 4 and [len(c.buffer) for c in chunks] == [64, 64, 64, 8]
    head = chunks[0]
    assert (head.dtype, list(head.size), head.requires_grad, head.compression, head.chunks) == (
        "float32",
        [100],
        True,
        CompressionType.FLOAT16,
        4,
    )
    for chunk in chunks[1:]:
        assert chunk.buffer and not chunk.dtype and not chunk.size and not chunk.chunks
        assert chunk.compression == CompressionType.NONE and not chunk.requires_grad


@pytest.mark.parametrize("chunk_size", [1, 7, 400, 401, 10**6])
def test_split_then_combine_restores_the_message(chunk_size):
    serialized = serialize_torch_tensor(torch.randn(10, 10))
    combined = combine_from_streaming(split_for_streaming(serialized, chunk_size))
    assert combined.buffer == serialized.buffer
    assert (combined.dtype, list(combined.size), combined.compression) == ("float32", [10, 10], 0)


def test_empty_tensor_is_one_message_that_counts_zero_chunks():
    chunks = list(split_for_streaming(serialize_torch_tensor(torch.zeros(0)), 16))
    assert len(chunks) == 1 and chunks[0].chunks == 0 and chunks[0].dtype == "float32"


def test_combine_rejects_no_chunks_and_headless_chunks():
    with pytest.raises(ValueError):
        combine_from_streaming([])
    with pytest.raises(ValueError, match="metadata"):
        combine_from_streaming([runtime_pb2.Tensor(buffer=b"abc")])


def test_split_rejects_non_positive_chunk_size():
    with pytest.raises(ValueError):
        list(split_for_streaming(serialize_torch_tensor(torch.zeros(3)), 0))


async def stream_of(messages):
    for message in messages:
        yield message


async def test_tensor_stream_starts_a_new_tensor_at_each_chunk_with_dtype():
    tensors = [torch.randn(50), torch.arange(7), torch.zeros(0), torch.randn(3, 3)]
    compressions = [CompressionType.FLOAT16, CompressionType.NONE, CompressionType.NONE, CompressionType.UNIFORM_8BIT]
    chunks = [
        chunk
        for tensor, compression in zip(tensors, compressions)
        for chunk in split_for_streaming(serialize_torch_tensor(tensor, compression), 16)
    ]
    # the stream delivers lists of chunks, cut at arbitrary points
    messages = [chunks[:3], chunks[3:4], [], chunks[4:]]
    restored = await deserialize_tensor_stream(stream_of(messages))
    assert len(restored) == 4
    assert torch.allclose(restored[0], tensors[0], atol=1e-2)
    assert torch.equal(restored[1], tensors[1]) and restored[2].shape == (0,)
    assert restored[3].shape == (3, 3)


async def test_tensor_stream_rejects_continuation_before_metadata():
    with pytest.raises(TensorDecodeError, match="metadata"):
        await deserialize_tensor_stream(stream_of([[runtime_pb2.Tensor(buffer=b"1234")]]))


async def test_tensor_stream_rejects_a_tensor_with_missing_chunks():
    chunks = list(split_for_streaming(serialize_torch_tensor(torch.randn(40)), 32))
    with pytest.raises(TensorDecodeError):
        await deserialize_tensor_stream(stream_of([chunks[:-1]]))


async def test_empty_stream_gives_no_tensors():
    assert await deserialize_tensor_stream(stream_of([])) == []
