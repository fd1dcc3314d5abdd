"""Counting the tensors of an ExpertRequest / ExpertResponse on the wire, before protobuf parses it.

Why: protobuf materialises every entry of a repeated field. A 4 MiB message made of two-byte empty ``Tensor`` entries
holds two million of them and parses into about 150 MiB, although its size is within every message limit. An expert
takes and returns a known number of tensors (its inputs, and for backward also the gradients of its outputs; its
outputs, or for backward the gradients of its inputs), so a message that carries more is refused from a scan of its
wire bytes that looks only at field headers and lengths (a few microseconds for a valid message: it holds a handful
of fields whatever the size of its tensors). The server scans requests (server/request_scan.py), clients responses.

Limits, per message (a unary call, or one message of a stream):
- ``tensors`` entries: the expert's tensor count (for a request, when the uid came first, as every serializer writes
  it; otherwise the largest count among the hosted experts);
- fields of one ``Tensor``: at most ``MAX_FIELDS_PER_TENSOR`` (a valid one has at most 6, its shape packed into one),
  and at most ``MAX_TENSOR_DIMS`` dimensions in its shape;
- other top-level fields (the uid, the metadata, fields unknown to this version): at most ``MAX_OTHER_FIELDS``.
"""

from __future__ import annotations

from typing import Mapping, Optional, Tuple, Union

__all__ = ["MAX_FIELDS_PER_TENSOR", "MAX_TENSOR_DIMS", "MAX_OTHER_FIELDS", "MessageScanError", "scan_tensor_message"]

MAX_TENSOR_DIMS = 64  # what torch supports
MAX_FIELDS_PER_TENSOR = 16 + MAX_TENSOR_DIMS  # its dimensions may also come one field each (unpacked)
MAX_OTHER_FIELDS = 16
_MAX_UID_BYTES = 1024  # longer uids are never hosted: no need to decode them
_MAX_VARINT_BYTES = 10
_VARINT, _FIXED64, _LENGTH_DELIMITED, _FIXED32 = 0, 1, 2, 5
_UID_FIELD, _TENSORS_FIELD = 1, 2  # of ExpertRequest; ExpertResponse has the same tensors field and no uid
_SIZE_FIELD = 2  # of Tensor: the shape

Buffer = Union[bytes, bytearray, memoryview]


class MessageScanError(ValueError):
    """A message refused from its wire bytes: too many tensors or fields, or not a protobuf message."""


class _NotProtobuf(MessageScanError):
    """The bytes are not a protobuf message (the reason only; scan_tensor_message names the call)."""


def _varint(data: memoryview, start: int, end: int) -> Tuple[int, int]:
    if start < end and data[start] < 0x80:  # most keys and small lengths: one byte
        return data[start], start + 1
    value = shift = 0
    for position in range(start, min(end, start + _MAX_VARINT_BYTES)):
        byte = data[position]
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, position + 1
        shift += 7
    raise _NotProtobuf("a truncated or overlong varint")


def _next_field(data: memoryview, position: int, end: int) -> Tuple[int, int, int, int]:
    """(field number, wire type, start of its value, end of its value) of the field at ``position``."""
    key, position = _varint(data, position, end)
    field, wire_type = key >> 3, key & 7
    if wire_type == _VARINT:
        _, stop = _varint(data, position, end)
    elif wire_type == _LENGTH_DELIMITED:
        length, position = _varint(data, position, end)
        stop = position + length
    elif wire_type == _FIXED64:
        stop = position + 8
    elif wire_type == _FIXED32:
        stop = position + 4
    else:  # groups (deprecated, never written by hivemind) or invalid wire types
        raise _NotProtobuf(f"wire type {wire_type}")
    if stop > end:
        raise _NotProtobuf("a field runs past its end")
    return field, wire_type, position, stop


def _check_tensor(data: memoryview, position: int, end: int, what: str, index: int) -> None:
    fields = dims = 0
    while position < end:
        field, wire_type, start, position = _next_field(data, position, end)
        fields += 1
        if field == _SIZE_FIELD:  # packed: at least one byte per dimension; unpacked: one field per dimension
            dims += position - start if wire_type == _LENGTH_DELIMITED else 1
        if fields > MAX_FIELDS_PER_TENSOR or dims > MAX_TENSOR_DIMS:
            raise MessageScanError(
                f"{what}: tensor #{index} has more than {MAX_TENSOR_DIMS} dimensions or {MAX_FIELDS_PER_TENSOR} "
                "fields; the message is refused"
            )


def scan_tensor_message(
    data: Buffer, limit: Optional[int], what: str, limits_by_uid: Optional[Mapping[str, int]] = None
) -> None:
    """Refuse (MessageScanError) a message that holds more than ``limit`` tensors, or bloated ones.

    :param limit: the most ``tensors`` entries accepted; None: the largest of ``limits_by_uid``, found only when a
      tensor comes before a known uid (a request that names its expert first costs nothing per hosted expert)
    :param what: names the call in errors, e.g. "forward"
    :param limits_by_uid: {uid: limit} for requests: once the uid field was read, its own limit applies
    """
    try:
        _scan(memoryview(data), limit, what, limits_by_uid)
    except _NotProtobuf as e:
        raise MessageScanError(f"{what}: not a valid expert message ({e})") from None


def _scan(data: memoryview, limit: Optional[int], what: str, limits_by_uid: Optional[Mapping[str, int]]) -> None:
    position, end, tensors, others, uid = 0, len(data), 0, 0, None
    while position < end:
        field, wire_type, start, position = _next_field(data, position, end)
        if field == _TENSORS_FIELD and wire_type == _LENGTH_DELIMITED:
            tensors += 1
            if limit is None:
                limit = max(limits_by_uid.values(), default=0) if limits_by_uid else 0
            if tensors > limit:
                named = f" of {uid}" if uid is not None else ""
                raise MessageScanError(f"{what}{named} expects {limit} tensors, got more; the message is refused")
            _check_tensor(data, start, position, what, tensors - 1)
            continue
        others += 1
        if others > MAX_OTHER_FIELDS:
            raise MessageScanError(f"{what}: the message has more than {MAX_OTHER_FIELDS} fields besides its tensors")
        if (
            limits_by_uid
            and field == _UID_FIELD
            and wire_type == _LENGTH_DELIMITED
            and position - start <= _MAX_UID_BYTES
        ):
            candidate = bytes(data[start:position]).decode(errors="replace")
            if candidate in limits_by_uid:
                uid, limit = candidate, limits_by_uid[candidate]
