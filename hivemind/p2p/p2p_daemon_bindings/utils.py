"""Errors of the p2pd control channel and varint-delimited protobuf framing."""

import asyncio
from typing import Tuple, TypeVar

from google.protobuf.message import Message

from hivemind.proto import p2pd_pb2

MAX_VARINT_BYTES = 10  # an unsigned 64-bit LEB128 varint takes at most 10 bytes
MAX_VARINT_VALUE = 2**64 - 1

MessageType = TypeVar("MessageType", bound=Message)


class P2PDaemonError(RuntimeError):
    """The p2pd daemon or the control channel to it failed (start-up, size limit, error reply, daemon exit)."""


class RequestTooLargeError(P2PDaemonError):
    """A request is larger than the control channel accepts (``persistent_conn_max_msg_size``); it was not sent."""


class ControlFailure(P2PDaemonError):
    """The daemon answered a control request with ``Response{type=ERROR}``."""


class DispatchFailure(P2PDaemonError):
    """An incoming stream or unary request could not be dispatched to a local handler."""


class P2PHandlerError(Exception):
    """A remote handler raised an exception or returned an error; the message carries the remote text."""


def encode_varint(value: int) -> bytes:
    """Encode a non-negative integer as an unsigned LEB128 varint."""
    if not 0 <= value <= MAX_VARINT_VALUE:
        raise ValueError(f"varint value must be in [0, 2**64), got {value}")
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def decode_varint(data: bytes, offset: int = 0) -> Tuple[int, int]:
    """Decode a varint from ``data[offset:]``; returns ``(value, offset_after_varint)``."""
    value = shift = 0
    for index in range(offset, min(len(data), offset + MAX_VARINT_BYTES)):
        byte = data[index]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            if value > MAX_VARINT_VALUE:
                raise ValueError("varint exceeds 64 bits")
            return value, index + 1
        shift += 7
    if len(data) - offset >= MAX_VARINT_BYTES:
        raise ValueError(f"varint is longer than {MAX_VARINT_BYTES} bytes")
    raise ValueError("truncated varint")


async def read_unsigned_varint(reader: asyncio.StreamReader) -> int:
    """Read one varint from an asyncio stream; raises ``asyncio.IncompleteReadError`` on EOF."""
    value = shift = 0
    for _ in range(MAX_VARINT_BYTES):
        byte = (await reader.readexactly(1))[0]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            if value > MAX_VARINT_VALUE:
                raise ValueError("varint exceeds 64 bits")
            return value
        shift += 7
    raise ValueError(f"varint is longer than {MAX_VARINT_BYTES} bytes")


def serialize_delimited(message: Message) -> bytes:
    """Serialize a protobuf message with a varint length prefix."""
    payload = message.SerializeToString()
    return encode_varint(len(payload)) + payload


async def read_delimited_bytes(reader: asyncio.StreamReader, max_size: int) -> bytes:
    """Read one varint-delimited frame of at most ``max_size`` bytes."""
    size = await read_unsigned_varint(reader)
    if size > max_size:
        raise P2PDaemonError(f"Incoming message of {size} bytes exceeds the limit of {max_size} bytes")
    read_payload = getattr(reader, "read_payload", reader.readexactly)  # fewer copies for large messages
    return await read_payload(size)


async def read_pbmsg_safe(reader: asyncio.StreamReader, message: MessageType, max_size: int) -> MessageType:
    """Read one varint-delimited protobuf message into ``message`` (parsed in place) and return it."""
    message.ParseFromString(await read_delimited_bytes(reader, max_size))
    return message


async def write_pbmsg(writer: asyncio.StreamWriter, message: Message) -> None:
    """Write one varint-delimited protobuf message and wait until it is flushed to the transport."""
    writer.write(serialize_delimited(message))
    await writer.drain()


def raise_if_failed(response: p2pd_pb2.Response) -> None:
    """Turn a daemon ``Response{type=ERROR}`` into ``ControlFailure``."""
    if response.type == p2pd_pb2.Response.ERROR:
        raise ControlFailure(f"p2pd returned an error: {response.error.msg}")
