"""Decoders never trust the sender: malformed messages raise TensorDecodeError (a ValueError), nothing worse."""

import struct

import pytest
import torch

from hivemind.compression import TensorDecodeError, deserialize_torch_tensor, serialize_torch_tensor
from hivemind.p2p.p2p_daemon_bindings.utils import encode_varint
from hivemind.proto import runtime_pb2
from hivemind.proto.runtime_pb2 import CompressionType

ALL_TYPES = [CompressionType.Value(name) for name in CompressionType.keys()]


def valid_message(compression: int) -> runtime_pb2.Tensor:
    return serialize_torch_tensor(torch.randn(6, 5000), compression)


def with_changes(message: runtime_pb2.Tensor, **fields) -> runtime_pb2.Tensor:
    changed = runtime_pb2.Tensor()
    changed.CopyFrom(message)
    for name, value in fields.items():
        if name == "size":
            del changed.size[:]
            changed.size.extend(value)
        else:
            setattr(changed, name, value)
    return changed


def test_decode_error_is_a_value_error():
    assert issubclass(TensorDecodeError, ValueError)


@pytest.mark.parametrize("compression", ALL_TYPES, ids=CompressionType.Name)
@pytest.mark.parametrize("cut", [1, 7, 1000])
def test_truncated_buffer_is_rejected(compression, cut):
    message = valid_message(compression)
    with pytest.raises(TensorDecodeError):
        deserialize_torch_tensor(with_changes(message, buffer=message.buffer[:-cut]))


@pytest.mark.parametrize("compression", ALL_TYPES, ids=CompressionType.Name)
def test_buffer_with_extra_bytes_is_rejected(compression):
    message = valid_message(compression)
    with pytest.raises(TensorDecodeError):
        deserialize_torch_tensor(with_changes(message, buffer=message.buffer + b"\x00" * 4))


@pytest.mark.parametrize("compression", ALL_TYPES, ids=CompressionType.Name)
def test_empty_buffer_for_a_nonempty_shape_is_rejected(compression):
    with pytest.raises(TensorDecodeError):
        deserialize_torch_tensor(with_changes(valid_message(compression), buffer=b""))


@pytest.mark.parametrize("compression", ALL_TYPES, ids=CompressionType.Name)
@pytest.mark.parametrize("size", [[7, 5000], [30001], [2**31, 2**31, 2**31], [1] * 65])
def test_shape_that_does_not_match_the_buffer_is_rejected_without_allocating(compression, size):
    with pytest.raises(TensorDecodeError):
        deserialize_torch_tensor(with_changes(valid_message(compression), size=size))


@pytest.mark.parametrize("compression", ALL_TYPES, ids=CompressionType.Name)
@pytest.mark.parametrize("dtype", ["float128", "torch.float32", "", "object", "str", "x" * 1000])
def test_unknown_dtype_is_rejected(compression, dtype):
    with pytest.raises(TensorDecodeError, match="dtype"):
        deserialize_torch_tensor(with_changes(valid_message(compression), dtype=dtype))


# BLOCKWISE_8BIT integer and bool messages are valid: hivemind 1.1.12 writes them (decoded as it does: tests/interop/)
LOSSY_FLOATING_ONLY = [t for t in ALL_TYPES if t not in (CompressionType.NONE, CompressionType.BLOCKWISE_8BIT)]


@pytest.mark.parametrize("compression", LOSSY_FLOATING_ONLY, ids=CompressionType.Name)
@pytest.mark.parametrize("dtype", ["int64", "bool", "uint8"])
def test_lossy_message_claiming_an_integer_dtype_is_rejected(compression, dtype):
    with pytest.raises(TensorDecodeError, match="floating"):
        deserialize_torch_tensor(with_changes(valid_message(compression), dtype=dtype))


@pytest.mark.parametrize("compression_value", [6, 100, 2**31 - 1])
def test_unknown_compression_type_is_rejected(compression_value):
    message = runtime_pb2.Tensor.FromString(valid_message(CompressionType.NONE).SerializeToString())
    raw = message.SerializeToString() + bytes([0x28]) + encode_varint(compression_value)  # field 5, varint
    with pytest.raises(TensorDecodeError, match="compression"):
        deserialize_torch_tensor(runtime_pb2.Tensor.FromString(raw))


def test_requires_grad_on_an_integer_tensor_is_rejected():
    message = with_changes(serialize_torch_tensor(torch.arange(5)), requires_grad=True)
    with pytest.raises(TensorDecodeError, match="requires_grad"):
        deserialize_torch_tensor(message)


def test_bfloat16_buffer_of_wrong_width_is_rejected():
    message = serialize_torch_tensor(torch.randn(10).bfloat16())
    with pytest.raises(TensorDecodeError):
        deserialize_torch_tensor(with_changes(message, buffer=message.buffer[:30]))


def test_bool_buffer_with_arbitrary_bytes_decodes_to_proper_booleans():
    message = runtime_pb2.Tensor(buffer=bytes([0, 1, 2, 255]), size=[4], dtype="bool")
    assert deserialize_torch_tensor(message).tolist() == [False, True, True, True]


@pytest.mark.parametrize("compression", [CompressionType.UNIFORM_8BIT, CompressionType.QUANTILE_8BIT])
@pytest.mark.parametrize("num_codes", [0, -1, 257, 2**62])
def test_8bit_code_book_size_out_of_range_is_rejected(compression, num_codes):
    message = valid_message(compression)
    buffer = struct.pack("<q", num_codes) + message.buffer[8:]
    with pytest.raises(TensorDecodeError, match="code book"):
        deserialize_torch_tensor(with_changes(message, buffer=buffer))


@pytest.mark.parametrize("compression", [CompressionType.UNIFORM_8BIT, CompressionType.QUANTILE_8BIT])
def test_8bit_index_beyond_a_short_code_book_is_rejected(compression):
    codebook = struct.pack("<q", 2) + struct.pack("<2f", 0.5, 1.5)
    message = runtime_pb2.Tensor(
        buffer=codebook + bytes([0, 1, 2]), size=[3], dtype="float32", compression=compression
    )
    with pytest.raises(TensorDecodeError, match="index"):
        deserialize_torch_tensor(message)


@pytest.mark.parametrize("compression", [CompressionType.UNIFORM_8BIT, CompressionType.QUANTILE_8BIT])
def test_8bit_short_code_book_with_valid_indices_decodes(compression):
    codebook = struct.pack("<q", 2) + struct.pack("<2f", 0.5, 1.5)
    message = runtime_pb2.Tensor(
        buffer=codebook + bytes([0, 1, 1]), size=[3], dtype="float32", compression=compression
    )
    assert deserialize_torch_tensor(message).tolist() == [0.5, 1.5, 1.5]


@pytest.mark.parametrize(
    "num_blocks, num_codes", [(1, 256), (3, 256), (-2, 256), (2, 0), (2, 300), (2**40, 256), (2, -(2**40))]
)
def test_blockwise_inconsistent_header_is_rejected(num_blocks, num_codes):
    message = valid_message(CompressionType.BLOCKWISE_8BIT)  # 30000 elements = 8 blocks
    buffer = struct.pack("<qq", num_blocks, num_codes) + message.buffer[16:]
    with pytest.raises(TensorDecodeError):
        deserialize_torch_tensor(
            with_changes(message, buffer=buffer, size=[5000] if num_blocks in (1, 3) else [6, 5000])
        )


def test_blockwise_index_beyond_a_short_code_book_is_rejected():
    buffer = struct.pack("<qq", 1, 2) + struct.pack("<f", 1.0) + struct.pack("<2f", -1.0, 1.0) + bytes([0, 1, 5])
    message = runtime_pb2.Tensor(buffer=buffer, size=[3], dtype="float32", compression=CompressionType.BLOCKWISE_8BIT)
    with pytest.raises(TensorDecodeError, match="index"):
        deserialize_torch_tensor(message)


@pytest.mark.parametrize("compression", ALL_TYPES, ids=CompressionType.Name)
def test_header_only_or_garbage_buffers_are_rejected(compression):
    for garbage in (b"\x01", b"\xff" * 15, b"\x00" * 17):
        with pytest.raises(TensorDecodeError):
            deserialize_torch_tensor(with_changes(valid_message(compression), buffer=garbage))


@pytest.mark.parametrize("compression", ALL_TYPES, ids=CompressionType.Name)
@pytest.mark.parametrize("size", [[0, 2**30, 10, 9, 2**31], [2**31 - 1, 0, 2**31 - 1, 2**31 - 1]])
def test_empty_shape_with_overflowing_sizes_is_rejected(compression, size):
    message = with_changes(valid_message(compression), size=size, buffer=b"")
    with pytest.raises(TensorDecodeError):
        deserialize_torch_tensor(message)
