"""``AveragingData`` messages that carry an uncompressed tensor, encoded straight from the tensor's memory.

Building such a message through protobuf copies the tensor three times before it reaches the stream (into a bytes
object, into the message, and out again when the frame is written). Here the message is written as protobuf wire
bytes around a memoryview of the tensor: the same bytes a protobuf encoder produces (fields in number order, default
values omitted), which every protobuf parser reads back as the same message.
"""

from __future__ import annotations

import struct
from typing import Optional

import torch

from hivemind.compression.buffers import dtype_to_name
from hivemind.p2p.framing import EncodedMessage

__all__ = ["RAW_DTYPES", "encode_averaging_data"]

# dtypes whose NONE-compressed wire bytes are exactly their memory (bfloat16 travels as float32 by default, bool is
# normalized to 0/1 by the codec)
RAW_DTYPES = (torch.float32, torch.float64, torch.float16, torch.int64, torch.int32, torch.int16, torch.int8)

_LENGTH_DELIMITED, _VARINT, _FIXED64 = 2, 0, 1


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _key(field_number: int, wire_type: int) -> bytes:
    return _varint((field_number << 3) | wire_type)


def encode_averaging_data(
    tensor: torch.Tensor,
    *,
    code: int = 0,
    group_id: bytes = b"",
    weight: float = 0.0,
    dtype_name: Optional[str] = None,
) -> EncodedMessage:
    """``AveragingData(code, group_id, tensor_part=<tensor, NONE compression>, weight)`` as wire bytes.

    :param tensor: a contiguous 1-D CPU tensor of one of RAW_DTYPES; it is referenced, not copied, and must stay
        unchanged until the message is written
    """
    if tensor.dtype not in RAW_DTYPES or tensor.dim() != 1 or not tensor.is_contiguous():
        raise ValueError(f"expected a contiguous 1-D tensor of {RAW_DTYPES}, got {tensor.dtype} {tuple(tensor.shape)}")
    data = memoryview(tensor.detach().numpy()).cast("B")
    dtype_bytes = (dtype_name or dtype_to_name(tensor.dtype)).encode()
    sizes = _varint(tensor.numel())
    tensor_tail = (
        _key(2, _LENGTH_DELIMITED) + _varint(len(sizes)) + sizes  # size: packed repeated uint32
        + _key(4, _LENGTH_DELIMITED) + _varint(len(dtype_bytes)) + dtype_bytes  # dtype
    )  # fmt: skip
    buffer_key = _key(1, _LENGTH_DELIMITED) + _varint(data.nbytes) if data.nbytes else b""
    tensor_length = len(buffer_key) + data.nbytes + len(tensor_tail)
    head = b""
    if code:
        head += _key(1, _VARINT) + _varint(code)
    if group_id:
        head += _key(2, _LENGTH_DELIMITED) + _varint(len(group_id)) + group_id
    head += _key(4, _LENGTH_DELIMITED) + _varint(tensor_length) + buffer_key
    tail = tensor_tail + (_key(5, _FIXED64) + struct.pack("<d", weight) if weight != 0.0 else b"")
    return EncodedMessage([head, data, tail] if data.nbytes else [head, tail])
