"""Decoding tensors from a peer's stream or message takes memory for what the tensor can hold, not for whatever the
peer keeps sending or claims: chunks past a tensor's size, millions of dimensions."""

import tracemalloc

import pytest
import torch

from hivemind.compression import TensorDecodeError, deserialize_tensor_stream, deserialize_torch_tensor
from hivemind.compression.serialization import serialize_torch_tensor
from hivemind.proto import runtime_pb2
from hivemind.utils.streaming import split_for_streaming

CompressionType = runtime_pb2.CompressionType


async def test_stream_stops_at_the_first_chunk_past_the_tensors_size():
    taken = []

    async def endless_continuation():
        yield [runtime_pb2.Tensor(buffer=bytes(4), size=[1], dtype="float32", chunks=2)]
        for index in range(1000):  # a peer that keeps sending bytes for a one-element tensor
            taken.append(index)
            yield [runtime_pb2.Tensor(buffer=bytes(4096))]

    with pytest.raises(TensorDecodeError, match="more than"):
        await deserialize_tensor_stream(endless_continuation())
    assert len(taken) <= 2, f"{len(taken)} chunks of 4 KiB were read for a 4-byte tensor"


@pytest.mark.parametrize("compression", list(CompressionType.values()), ids=list(CompressionType.keys()))
@pytest.mark.parametrize("shape", [(), (0,), (7, 0), (3, 5), (5000,), (2, 4097)])
async def test_every_codec_fits_the_stream_bound(compression, shape):
    from hivemind.compression.serialization import max_buffer_bytes

    tensor = torch.randn(shape)
    serialized = serialize_torch_tensor(tensor, compression)
    assert len(serialized.buffer) <= max_buffer_bytes(serialized)

    async def chunks():
        for chunk in split_for_streaming(serialized, 1000):
            yield [chunk]

    (restored,) = await deserialize_tensor_stream(chunks())
    assert restored.shape == tensor.shape


async def test_several_tensors_in_one_stream_each_get_their_own_bound():
    tensors = [torch.randn(3000), torch.arange(10), torch.randn(2, 3)]
    messages = [serialize_torch_tensor(t) for t in tensors]

    async def chunks():
        for message in messages:
            yield list(split_for_streaming(message, 512))

    restored = await deserialize_tensor_stream(chunks())
    assert all(torch.equal(a, b) for a, b in zip(restored, tensors))


def test_millions_of_dimensions_are_refused_before_they_become_python_ints():
    message = runtime_pb2.Tensor(dtype="float32")
    message.size.extend([1] * 2**22)
    tracemalloc.start()
    try:
        with pytest.raises(TensorDecodeError, match="dimensions"):
            deserialize_torch_tensor(message)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2**20, f"refusing {len(message.size)} dimensions took {peak} bytes"
