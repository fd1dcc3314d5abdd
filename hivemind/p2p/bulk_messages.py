"""Received protobuf messages whose bulk (one nested bytes field, e.g. a tensor's buffer) stays in the frame.

Parsing a frame into a protobuf object copies every bytes field into the object, and reading such a field copies it
again into a new ``bytes``: two passes over a megabyte-sized tensor before any use of it. A type made by
``bulk_message_type(MessageType, field_names)`` parses the same frames differently: it walks the wire format down to
that field, parses everything else (a few dozen bytes) with protobuf, and keeps the field's value as ``bulk``, a
memoryview of the received payload. Handlers and callers opt in by naming such a type as their request or response
type; the bytes on the wire are those of ``MessageType`` either way.

The result equals what protobuf parses in every case: the shortcut is taken only when the path to the field is
unambiguous (each field on it appears exactly once, length-delimited, within its parent's bounds); any other frame,
malformed ones included, goes through protobuf's own parser (and raises its ``DecodeError``). Reading the field
through the message (``received.tensor_part.buffer``) works as usual: it copies the bulk into the message first.
"""

from typing import Any, FrozenSet, List, Optional, Sequence, Tuple, Type

from google.protobuf.message import Message

from hivemind.p2p.p2p_daemon_bindings.utils import encode_varint

__all__ = ["BulkMessage", "bulk_message_type", "MIN_BULK_BYTES"]

# a field shorter than this is parsed by protobuf with the rest (the walk in Python costs more than the copy)
MIN_BULK_BYTES = 1 << 16
# the walk gives up (protobuf parses the frame) on a level with more fields than this: an honest message has a few
MAX_FIELDS_WALKED = 64
_LENGTH_DELIMITED = 2


class _Irregular(Exception):
    """The frame is not one the shortcut handles: protobuf parses it (and judges whether it is malformed)."""


def _varint(buffer: memoryview, position: int, end: int) -> Tuple[int, int]:
    result = shift = 0
    while True:
        if position >= end or shift > 63:
            raise _Irregular
        byte = buffer[position]
        position += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, position
        shift += 7


def _only_field(buffer: memoryview, start: int, end: int, number: int) -> Tuple[int, int, int]:
    """``(key_start, value_start, value_end)`` of the only occurrence of length-delimited field ``number`` in
    ``buffer[start:end]``; raises _Irregular if it is absent, repeated, of another wire type, or if any field
    runs past ``end``."""
    found: Optional[Tuple[int, int, int]] = None
    position, fields = start, 0
    while position < end:
        fields += 1
        if fields > MAX_FIELDS_WALKED:
            raise _Irregular
        key_start = position
        key, position = _varint(buffer, position, end)
        wire_type = key & 7
        if wire_type == 0:
            _, position = _varint(buffer, position, end)
        elif wire_type == 1:
            position += 8
        elif wire_type == 5:
            position += 4
        elif wire_type == _LENGTH_DELIMITED:
            length, position = _varint(buffer, position, end)
            value_start, position = position, position + length
            if key >> 3 == number and position <= end:
                if found is not None:
                    raise _Irregular
                found = (key_start, value_start, position)
        else:
            raise _Irregular  # groups (deprecated) and invalid wire types
        if position > end:
            raise _Irregular
        if key >> 3 == number and wire_type != _LENGTH_DELIMITED:
            raise _Irregular
    if found is None:
        raise _Irregular
    return found


class BulkMessage:
    """A received message of ``message_type`` with the field at ``bulk_path`` kept apart (see the module docstring).

    :ivar message: the parsed message; its bulk field is empty while ``bulk`` is not None
    :ivar bulk: the field's value as a memoryview of the received payload (writable if the payload was), or None if
        the frame was parsed by protobuf as a whole (then the field is in ``message``)
    """

    message_type: Type[Message]
    bulk_path: Tuple[str, ...] = ()
    _bulk_numbers: Tuple[int, ...] = ()
    _direct_fields: FrozenSet[str] = frozenset()
    __slots__ = ("message", "bulk")

    def __init__(self) -> None:
        self.message = self.message_type()
        self.bulk: Optional[memoryview] = None

    def ParseFromString(self, payload: Any) -> int:
        """Parse one frame's payload (bytes, bytearray or memoryview), as ``Message.ParseFromString`` does."""
        self.message.Clear()
        self.bulk = None
        view = payload if isinstance(payload, memoryview) else memoryview(payload)
        try:
            rest, bulk = self._split(view)
        except _Irregular:
            return self.message.ParseFromString(payload)
        self.message.ParseFromString(rest)
        self.bulk = bulk
        return len(view)

    @classmethod
    def _split(cls, view: memoryview) -> Tuple[bytes, memoryview]:
        """``(the payload without the bulk field, the bulk)``; _Irregular if the shortcut does not apply."""
        spans: List[Tuple[int, int, int]] = []  # (key start, value start, value end) of each field on the path
        start, end = 0, len(view)
        for number in cls._bulk_numbers:
            key_start, start, end = _only_field(view, start, end, number)
            spans.append((key_start, start, end))
        if end - start < MIN_BULK_BYTES:
            raise _Irregular

        def without_bulk(level: int) -> List[Any]:
            """The value of the field at ``level`` (-1: the payload) with the bulk field left out."""
            start, end = (0, len(view)) if level < 0 else spans[level][1:]
            child_key_start, _, child_end = spans[level + 1]
            if level + 1 == len(spans) - 1:
                return [view[start:child_key_start], view[child_end:end]]
            content = without_bulk(level + 1)
            key = encode_varint((cls._bulk_numbers[level + 1] << 3) | _LENGTH_DELIMITED)
            header = key + encode_varint(sum(len(piece) for piece in content))
            return [view[start:child_key_start], header, *content, view[child_end:end]]

        return b"".join(without_bulk(-1)), view[spans[-1][1] : spans[-1][2]]

    def materialize(self) -> Message:
        """The complete message: the bulk is copied into its field (once; ``bulk`` becomes None)."""
        if self.bulk is not None:
            target = self.message
            for name in self.bulk_path[:-1]:
                target = getattr(target, name)
            setattr(target, self.bulk_path[-1], bytes(self.bulk))
            self.bulk = None
        return self.message

    def __getattr__(self, name: str) -> Any:
        # a field off the bulk's path is read as it is; anything else sees the complete message
        if name in self._direct_fields:
            return getattr(self.message, name)
        return getattr(self.materialize(), name)

    def __repr__(self) -> str:
        bulk = "" if self.bulk is None else f", bulk={len(self.bulk)} bytes"
        return f"{type(self).__name__}({self.message!r}{bulk})"


def bulk_message_type(message_type: Type[Message], field_names: Sequence[str]) -> Type[BulkMessage]:
    """A ``BulkMessage`` type for ``message_type`` whose bulk is the bytes field at ``field_names`` (a path of
    singular fields: embedded messages, then the bytes field), e.g. ``("tensor_part", "buffer")``."""
    if not field_names:
        raise ValueError("field_names must name at least the bytes field")
    numbers, descriptor = [], message_type.DESCRIPTOR
    for depth, name in enumerate(field_names):
        field = descriptor.fields_by_name.get(name)
        if field is None or field.is_repeated:
            raise ValueError(f"{descriptor.full_name} has no singular field {name!r}")
        last = depth == len(field_names) - 1
        if last and field.type != field.TYPE_BYTES or not last and field.type != field.TYPE_MESSAGE:
            raise ValueError(f"{descriptor.full_name}.{name} must be {'bytes' if last else 'a message'}")
        numbers.append(field.number)
        descriptor = field.message_type
    direct = frozenset(f.name for f in message_type.DESCRIPTOR.fields if f.name != field_names[0])
    attributes = dict(
        message_type=message_type,
        bulk_path=tuple(field_names),
        _bulk_numbers=tuple(numbers),
        _direct_fields=direct,
        __slots__=(),
    )
    return type(f"Bulk{message_type.__name__}", (BulkMessage,), attributes)
