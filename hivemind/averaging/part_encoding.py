"""``AveragingData`` messages that carry an uncompressed tensor, encoded straight from the tensor's memory.

Building such a message through protobuf copies the tensor three times before it reaches the stream (into a bytes
object, into the message, and out again when the frame is written). Here the message is written as protobuf wire
bytes around a memoryview of the tensor: the same bytes a protobuf encoder produces (fields in number order, default
values omitted), which every protobuf parser reads back as the same message.
"""

from __future__ import annotations

import asyncio
import functools
import math
import struct
import sys
from typing import Callable, Optional, Tuple, Union

import torch

from hivemind.averaging.part_math import delta_dtype, largest_magnitude, sub_into, total_sum, zero_
from hivemind.averaging.partition import RAW_DTYPES, AllreduceException
from hivemind.compression import CompressionInfo, deserialize_torch_tensor, serialize_torch_tensor
from hivemind.compression.buffers import dtype_to_name, read_array
from hivemind.p2p.bulk_messages import BulkMessage, bulk_message_type
from hivemind.p2p.framing import EncodedMessage
from hivemind.p2p.p2p_daemon_bindings.utils import encode_varint
from hivemind.proto import averaging_pb2, runtime_pb2

__all__ = [
    "RAW_DTYPES",
    "ReceivedAveragingData",
    "wire_tensor",
    "CHEAP_WIRE_TYPES",
    "encode_averaging_data",
    "encode_delta",
    "decode_part",
    "is_private_view",
    "difference_as",
    "refuse_non_finite",
    "refuse_unsafe_part",
]

# codecs that cost about a memory copy per part: decoded on the event loop, the others in a thread
CHEAP_WIRE_TYPES = (runtime_pb2.CompressionType.NONE, runtime_pb2.CompressionType.FLOAT16)
# enum values read once (protobuf's enum attribute lookup costs microseconds, several times per part)
_NONE = runtime_pb2.CompressionType.NONE
_AVERAGED_PART = averaging_pb2.MessageCode.AVERAGED_PART

_LENGTH_DELIMITED, _VARINT, _FIXED64 = 2, 0, 1
_ITEMSIZES = {dtype: torch.empty((), dtype=dtype).element_size() for dtype in RAW_DTYPES}
_RAW_DTYPE_NAMES = frozenset(dtype_to_name(dtype) for dtype in RAW_DTYPES)

# AveragingData as parts and deltas are received: the tensor's bytes stay in the received frame (no copies) and are
# decoded from there (see hivemind.p2p.bulk_messages); the wire format is AveragingData's
ReceivedAveragingData = bulk_message_type(averaging_pb2.AveragingData, ("tensor_part", "buffer"))
AnyAveragingData = Union[averaging_pb2.AveragingData, BulkMessage]


def _key(field_number: int, wire_type: int) -> bytes:
    return encode_varint((field_number << 3) | wire_type)


def encode_averaging_data(
    tensor: torch.Tensor,
    *,
    code: int = 0,
    group_id: bytes = b"",
    peer_id: bytes = b"",
    weight: float = 0.0,
    dtype_name: Optional[str] = None,
) -> EncodedMessage:
    """``AveragingData(code, group_id, peer_id, tensor_part=<tensor, NONE compression>, weight)`` as wire bytes.

    :param tensor: a contiguous 1-D CPU tensor of one of RAW_DTYPES; it is referenced, not copied, and must stay
        unchanged until the message is written (a stream may still hold part of it after its write returned: until
        the stream is closed, in the worst case)
    """
    if tensor.dtype not in RAW_DTYPES or tensor.dim() != 1 or not tensor.is_contiguous():
        raise ValueError(f"expected a contiguous 1-D tensor of {RAW_DTYPES}, got {tensor.dtype} {tuple(tensor.shape)}")
    data = memoryview(tensor.detach().numpy()).cast("B").toreadonly()  # written later without a copy (see framing)
    dtype_bytes = (dtype_name or dtype_to_name(tensor.dtype)).encode()
    sizes = encode_varint(tensor.numel())
    tensor_tail = (
        _key(2, _LENGTH_DELIMITED) + encode_varint(len(sizes)) + sizes  # size: packed repeated uint32
        + _key(4, _LENGTH_DELIMITED) + encode_varint(len(dtype_bytes)) + dtype_bytes  # dtype
    )  # fmt: skip
    buffer_key = _key(1, _LENGTH_DELIMITED) + encode_varint(data.nbytes) if data.nbytes else b""
    tensor_length = len(buffer_key) + data.nbytes + len(tensor_tail)
    head = b""
    if code:
        head += _key(1, _VARINT) + encode_varint(code)
    if group_id:
        head += _key(2, _LENGTH_DELIMITED) + encode_varint(len(group_id)) + group_id
    if peer_id:
        head += _key(3, _LENGTH_DELIMITED) + encode_varint(len(peer_id)) + peer_id
    head += _key(4, _LENGTH_DELIMITED) + encode_varint(tensor_length) + buffer_key
    tail = tensor_tail + (_key(5, _FIXED64) + struct.pack("<d", weight) if weight != 0.0 else b"")
    return EncodedMessage([head, data, tail] if data.nbytes else [head, tail])


def difference_as(average: torch.Tensor, part_values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``average - part_values`` in ``dtype``; for integer dtypes the average is rounded first (half to even), so
    that every member ends at the same integer.

    Integer differences are computed in int64 and cast down with wrap-around: the difference of two int32 values
    may lie beyond the int32 range, but ``part_values + delta`` wraps back to exactly the rounded average."""
    if dtype.is_floating_point or dtype.is_complex or dtype == torch.bool:
        return (average - part_values).to(dtype)
    average = average.round()
    if average.is_floating_point():  # keep it within the dtype's range (float64 rounds int64's maximum up to 2^63)
        limits = torch.iinfo(dtype)
        high = float(limits.max) if dtype != torch.int64 else 2.0**63 - 1024
        average = average.clamp(float(limits.min), high)
    return (average.to(torch.int64) - part_values.to(torch.int64)).to(dtype)


def encode_delta(
    average: Optional[torch.Tensor],
    part_values: torch.Tensor,
    compression_type: int,
    info: Union[CompressionInfo, Callable[[], CompressionInfo]],
    in_place: bool = False,
) -> Union[averaging_pb2.AveragingData, EncodedMessage]:
    """AVERAGED_PART carrying ``average - part_values`` (zeros if ``average`` is None) in ``compression_type``.

    :param info: the part's CompressionInfo for the codec, or a function that returns it (called only if a codec
        runs: an uncompressed delta needs none)
    :param in_place: ``part_values`` is a private buffer (see :func:`is_private_view`) that nothing reads any more:
        an uncompressed difference is written over it instead of into new memory
    """
    dtype, code = delta_dtype(part_values.dtype), _AVERAGED_PART  # float32 for float16/bfloat16 parts
    numel = part_values.numel()
    if compression_type == _NONE and dtype in RAW_DTYPES:
        if average is None or average.dtype == dtype:  # one pass: the difference is what gets written
            delta = (
                part_values.reshape(-1)
                if in_place and part_values.is_contiguous() and part_values.dtype == dtype
                else torch.empty(numel, dtype=dtype)
            )
            if average is None:
                zero_(delta)
            else:
                sub_into(delta, average, part_values)
            return encode_averaging_data(delta, code=code)
    reply = averaging_pb2.AveragingData(code=code)
    delta = torch.zeros(numel, dtype=dtype) if average is None else difference_as(average, part_values, dtype)
    info = info if isinstance(info, CompressionInfo) else info()
    reply.tensor_part.CopyFrom(serialize_torch_tensor(delta, compression_type, info=info, allow_inplace=True))
    return reply


def wire_tensor(message: AnyAveragingData) -> Tuple[Optional[runtime_pb2.Tensor], Optional[memoryview]]:
    """``(tensor_part, bulk)`` of a received AveragingData: ``tensor_part`` is None if the message has none; ``bulk``
    is its buffer as a view of the received frame (then ``tensor_part.buffer`` is empty), or None."""
    if isinstance(message, BulkMessage):
        message, bulk = message.message, message.bulk
    else:
        bulk = None
    return (message.tensor_part if message.HasField("tensor_part") else None), bulk


def is_private_view(message: AnyAveragingData) -> bool:
    """Whether :func:`decode_part` returns ``message``'s tensor as a writable view of the received frame's own buffer
    (which nothing else references), rather than new or read-only memory."""
    serialized, bulk = wire_tensor(message)
    return (
        bulk is not None
        and not bulk.readonly
        and sys.byteorder == "little"
        and serialized.compression == _NONE
        and serialized.dtype in _RAW_DTYPE_NAMES
    )


async def decode_part(message: AnyAveragingData, numel: int, dtype: torch.dtype, what: str) -> torch.Tensor:
    """The flat tensor of a part or delta from a peer; its size and dtype are checked before anything is decoded.
    A delta (AVERAGED_PART) of a float16/bfloat16 part may come in float32 (as hivemind 1.1.12 sends it) or in the
    part's dtype.

    An uncompressed tensor of a ReceivedAveragingData is a view of the received frame (no copy; its start may not be
    aligned to its element size, which NumPy and torch CPU kernels handle).

    :raises AllreduceException: the message has no tensor, announces another size or dtype, or cannot be decoded
    """
    serialized, bulk = wire_tensor(message)
    if serialized is None:
        raise AllreduceException(f"{what} has no tensor")
    announced = math.prod(serialized.size) if len(serialized.size) <= 64 else -1
    expected = dtype_to_name(dtype)
    code = (message.message if isinstance(message, BulkMessage) else message).code
    if delta_dtype(dtype) != dtype and code == _AVERAGED_PART:  # a float16/bfloat16 part's delta: either dtype
        expected = f"{expected} or {dtype_to_name(delta_dtype(dtype))}"
        if serialized.dtype == dtype_to_name(delta_dtype(dtype)):
            dtype = delta_dtype(dtype)
    if announced != numel or serialized.dtype != dtype_to_name(dtype):
        raise AllreduceException(
            f"{what} has shape {list(serialized.size)[:8]} of {serialized.dtype[:32]!r}, expected "
            f"{numel} elements of {expected}"
        )
    if bulk is not None and serialized.compression == _NONE and dtype in RAW_DTYPES:
        return _view_of_bulk(bulk, numel, dtype, what)
    if bulk is not None:
        serialized = message.materialize().tensor_part  # a codec decodes it: the buffer is copied in once
    try:
        if serialized.compression in CHEAP_WIRE_TYPES:
            tensor = deserialize_torch_tensor(serialized)
        else:
            tensor = await asyncio.get_running_loop().run_in_executor(None, deserialize_torch_tensor, serialized)
    except ValueError as e:
        raise AllreduceException(f"{what} could not be decoded: {e}") from None
    if tensor.dtype != dtype or tensor.numel() != numel:
        raise AllreduceException(f"{what} decoded to {tensor.numel()} elements of {tensor.dtype}")
    return tensor.reshape(-1)


def _view_of_bulk(bulk: memoryview, numel: int, dtype: torch.dtype, what: str) -> torch.Tensor:
    itemsize = _ITEMSIZES[dtype]
    if len(bulk) != numel * itemsize:
        raise AllreduceException(
            f"{what} could not be decoded: its buffer has {len(bulk)} bytes, expected {numel * itemsize}"
        )
    if numel == 0:
        return torch.empty(0, dtype=dtype)
    if bulk.readonly or sys.byteorder != "little":
        return read_array(bulk, 0, numel, dtype).reshape(-1)  # warns nothing about read-only memory
    return torch.frombuffer(bulk, dtype=dtype, count=numel)


@functools.cache
def _never_overflows_below(dtype: torch.dtype) -> float:
    """Half the spacing of the dtype's values at its largest finite one: ``x + d`` rounds to a finite value for
    every finite ``x`` whenever ``|d|`` is below it (the exact sum stays under the point where rounding goes to inf).
    float32: 2**103, float64: 2**970, float16: 16."""
    info = torch.finfo(dtype)
    return math.ldexp(info.eps, math.frexp(info.max)[1] - 2)  # eps * 2**floor(log2(max)) / 2


def refuse_non_finite(values: torch.Tensor, local: torch.Tensor, what: str) -> None:
    """Raise AllreduceException if a peer's ``values`` (deltas) hold inf or NaN where this peer's ``local`` values are
    finite (a NaN that is already in the local values may come back; a new one would spread into the local tensors),
    or finite values that would make such local values inf once added to them."""
    if not (values.is_floating_point() or values.is_complex()):
        return
    if values.is_complex():
        if math.isfinite(abs(total_sum(values))):
            return  # a sum is finite only if every value is (an overflowing sum gets the exact check)
    else:
        # the sums end in the local dtype (a float16 part's delta is float32): overflow is judged in the narrower one
        narrow = local.dtype if local.is_floating_point() and local.element_size() < values.element_size() else None
        # (rounded twice, in float32 and then in the narrower dtype, a delta just below that bound reaches it: half)
        safe = _never_overflows_below(values.dtype) if narrow is None else _never_overflows_below(narrow) / 2
        peak = largest_magnitude(values)  # the fast pass: minimum and maximum, vectorized, no temporary
        if math.isfinite(peak) and peak < safe:
            return  # no inf or NaN, and too small to carry any finite value past the largest one: local is not read
        if math.isfinite(peak) and peak + largest_magnitude(local) <= torch.finfo(narrow or values.dtype).max:
            return  # no inf or NaN, and no sum with a local value can overflow
        if math.isfinite(peak):
            local = local.reshape(-1)
            sums = local + values if narrow is None else (local + values).to(narrow)
            overflow = ~torch.isfinite(sums) & torch.isfinite(local)
            if bool(overflow.any()):
                raise AllreduceException(
                    f"{what} would make {int(overflow.sum())} finite local values inf once added to them"
                )
            return
    spread = ~torch.isfinite(values) & torch.isfinite(local.reshape(-1))
    if bool(spread.any()):
        raise AllreduceException(f"{what} has {int(spread.sum())} inf/NaN values where the local values are finite")


def refuse_unsafe_part(values: torch.Tensor, weight: float, local: torch.Tensor, num_senders: int, what: str) -> None:
    """Raise AllreduceException if a sender's part would make the reducer's average inf or NaN: non-finite values
    (where ours are finite), or ``weight`` times its largest value above what the sum of ``num_senders`` such
    contributions can hold in the reducer's accumulator (float32 for float16/bfloat16/float32 parts)."""
    if values.numel() == 0 or values.dtype == torch.bool:
        return
    wide = values.dtype in (torch.float64, torch.complex128) or not (values.is_floating_point() or values.is_complex())
    limit = torch.finfo(torch.float64 if wide else torch.float32).max / max(num_senders, 1)
    if weight > limit:  # the reducer multiplies in its sum's dtype, where such a weight is inf (and inf * 0 is NaN)
        raise AllreduceException(f"{what}: weight {weight:g} is more than the reducer's sums can hold ({limit:g})")
    if values.dtype in (torch.float32, torch.float64):  # fast pass: the largest magnitude, single-threaded
        peak = largest_magnitude(values)  # NaN if a value is
        if math.isfinite(peak) and weight * peak <= limit:
            return
    if values.is_complex():
        peak = float(torch.linalg.vector_norm(values, ord=math.inf))
    else:
        low, high = torch.aminmax(values)
        peak = max(abs(float(low)), abs(float(high)))  # NaN if a value is NaN
    if not math.isfinite(peak):
        refuse_non_finite(values, local, what)
        return
    if weight * peak > limit:
        raise AllreduceException(
            f"{what}: weight {weight:g} times its largest value {peak:g} could overflow the sum of {num_senders} "
            "senders' parts"
        )
