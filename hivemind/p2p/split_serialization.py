"""Serialize a protobuf message whose bulk is one bytes field with one copy of that field instead of two.

``SerializeToString`` encodes a message into protobuf's own buffer and then copies it into a new ``bytes`` object,
so a 1 MiB tensor buffer is copied twice before it is sent. ``serialize_in_parts`` returns the message as parts
whose concatenation parses to an equal message: everything except the largest bytes field, then that field on its
own, wrapped again in the singular sub-messages that enclose it. This relies on two rules every protobuf parser
follows: the last value of a scalar field wins, and an embedded message that appears again is merged into the one
already parsed. Messages below ``MIN_SPLIT_BYTES``, and messages this cannot handle exactly (maps, extensions,
unknown fields on the way to the field), are serialized as usual.
"""

from typing import List, Optional, Tuple

from google.protobuf import unknown_fields
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from hivemind.p2p.p2p_daemon_bindings.utils import encode_varint

MIN_SPLIT_BYTES = 1 << 16
LENGTH_DELIMITED = 2


def _copy_field(target: Message, field: FieldDescriptor, value) -> None:
    if field.is_repeated:
        getattr(target, field.name).extend(value)
    elif field.type == FieldDescriptor.TYPE_MESSAGE:
        getattr(target, field.name).CopyFrom(value)
    else:
        setattr(target, field.name, value)


def _split(message: Message) -> Optional[Tuple[Message, List[FieldDescriptor], bytes]]:
    """``(rest, path, data)``: ``message`` without its largest bytes field, the fields leading to it, its value
    (None if no bytes field has MIN_SPLIT_BYTES). Sizes come from the bytes fields themselves, never from
    ``ByteSize()``, which the upb backend computes by serializing the whole message."""
    if len(unknown_fields.UnknownFieldSet(message)):
        return None
    fields = message.ListFields()
    best, best_size = None, MIN_SPLIT_BYTES - 1
    for field, value in fields:
        if field.is_extension or (field.message_type is not None and field.message_type.GetOptions().map_entry):
            return None  # not copied field by field here
        if field.is_repeated:
            continue  # a second occurrence would add an element instead of replacing or merging
        if field.type == FieldDescriptor.TYPE_BYTES:
            inner = None, [], value
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            inner = _split(value)  # sized by its largest bytes field: ByteSize() would serialize it (upb)
            if inner is None:
                continue
        else:
            continue
        if len(inner[2]) > best_size:
            best, best_size = (field, inner), len(inner[2])
    if best is None:
        return None
    target_field, (inner_rest, path, data) = best
    rest = type(message)()
    for field, value in fields:
        if field is target_field:
            if inner_rest is not None and inner_rest.ListFields():
                getattr(rest, field.name).CopyFrom(inner_rest)
            continue
        _copy_field(rest, field, value)
    return rest, [target_field, *path], data


def serialize_in_parts(message: Message) -> List[bytes]:
    """Parts whose concatenation parses to a message equal to ``message`` (the last part may be large)."""
    split = _split(message)  # None unless a bytes field has at least MIN_SPLIT_BYTES
    if split is None:
        return [message.SerializeToString()]
    rest, path, data = split
    headers, length = [], len(data)
    for field in reversed(path):  # innermost first: each header covers everything after it
        header = encode_varint((field.number << 3) | LENGTH_DELIMITED) + encode_varint(length)
        headers.append(header)
        length += len(header)
    return [rest.SerializeToString() + b"".join(reversed(headers)), data]
