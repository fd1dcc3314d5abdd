"""hivemind stream framing: 1-byte marker, 8-byte big-endian length, payload.

The codec functions are pure; the async helpers move frames over asyncio streams without concatenating
large payloads (header and payload are written separately, each payload is read with a single readexactly).
"""

import asyncio
import contextlib
from typing import AsyncContextManager, Awaitable, Callable, List, Optional, Sequence, Tuple, Type, TypeVar, Union

from google.protobuf.message import Message

from hivemind.p2p.p2p_daemon_bindings.utils import P2PDaemonError
from hivemind.p2p.split_serialization import serialize_in_parts
from hivemind.proto.p2pd_pb2 import RPCError
from hivemind.utils.asyncio import await_with_timeout

MARKER_LEN = 1
HEADER_LEN = 8  # length field, bytes
BYTEORDER = "big"
MESSAGE_MARKER = b"\x00"
ERROR_MARKER = b"\x01"
FRAME_HEADER_LEN = MARKER_LEN + HEADER_LEN
# a protobuf message cannot exceed 2 GiB, so a longer frame is a protocol violation
MAX_FRAME_PAYLOAD = 2**31 - 1
# the largest message a stream handler (or a caller, for responses) accepts unless told otherwise: frames that
# announce more are refused before anything is allocated for them
DEFAULT_MAX_MESSAGE_SIZE = 256 * 1024**2
# a frame that has started must keep arriving: its header within FRAME_STALL_TIMEOUT seconds of its first byte, its
# payload within FRAME_STALL_TIMEOUT seconds plus one second per MIN_FRAME_RATE bytes; a stream may stay idle between
# frames for as long as the caller likes. The same bound applies to a frame a handler writes (send_protobuf_in_time).
FRAME_STALL_TIMEOUT = 60.0
MIN_FRAME_RATE = 64 * 1024


def stall_bound(num_bytes: int) -> float:
    """Seconds that ``num_bytes`` of a frame may take to arrive, or to be taken by the peer: FRAME_STALL_TIMEOUT plus
    one second per MIN_FRAME_RATE bytes (read at call time: tests and slow links may change them)."""
    return FRAME_STALL_TIMEOUT + num_bytes / MIN_FRAME_RATE


# below this size, header and payload are joined into one write (one syscall beats one small copy)
JOIN_WRITE_THRESHOLD = 64 * 1024

END_OF_STREAM_FRAME = ERROR_MARKER + bytes(HEADER_LEN)  # an error frame with an empty RPCError

MessageType = TypeVar("MessageType", bound=Message)
Payload = bytes


class FramingError(P2PDaemonError):
    """A peer sent bytes that violate the stream framing (unknown marker, oversized frame, truncated frame)."""


class WriteStalledError(FramingError):
    """A peer did not take a frame written to it in time (see ``send_protobuf_in_time``)."""


class MessageTooLargeError(FramingError):
    """A peer announced a message larger than this side accepts (``max_message_size``); nothing was allocated."""


def encode_header(marker: bytes, length: int) -> bytes:
    """The 9-byte frame header for a payload of ``length`` bytes."""
    if marker not in (MESSAGE_MARKER, ERROR_MARKER):
        raise ValueError(f"Frame marker must be {MESSAGE_MARKER!r} or {ERROR_MARKER!r}, got {marker!r}")
    if not 0 <= length <= MAX_FRAME_PAYLOAD:
        raise ValueError(f"Frame payload must be between 0 and {MAX_FRAME_PAYLOAD} bytes, got {length}")
    return marker + length.to_bytes(HEADER_LEN, BYTEORDER)


def decode_length(length_bytes: bytes) -> int:
    """Payload length from the 8-byte length field; rejects lengths no protobuf message can have."""
    length = int.from_bytes(length_bytes, BYTEORDER)
    if length > MAX_FRAME_PAYLOAD:
        raise FramingError(
            f"Frame announces {length} bytes, more than the {MAX_FRAME_PAYLOAD} bytes a message can have"
        )
    return length


def decode_header(header: bytes) -> Tuple[bytes, int]:
    """``(marker, payload_length)`` of a 9-byte frame header; raises ``FramingError`` on an unknown marker."""
    if len(header) != FRAME_HEADER_LEN:
        raise ValueError(f"A frame header has {FRAME_HEADER_LEN} bytes, got {len(header)}")
    marker = header[:MARKER_LEN]
    if marker not in (MESSAGE_MARKER, ERROR_MARKER):
        raise FramingError(f"Invalid frame marker {marker!r}: expected {MESSAGE_MARKER!r} or {ERROR_MARKER!r}")
    return marker, decode_length(header[MARKER_LEN:])


class EncodedMessage:
    """A message that is already protobuf wire bytes, given as parts (e.g. a header and a memoryview of a tensor's
    memory): framed and written as they are, without building and re-encoding a protobuf object.

    A part given as a read-only memoryview is referenced, not copied, by a transport that cannot take it at once
    (the shared-memory pipe): its memory must stay unchanged until the stream took it (or closed)."""

    __slots__ = ("parts",)

    def __init__(self, parts: Sequence[Union[bytes, memoryview]]):
        self.parts = list(parts)


def _frame_parts(message: Union[Message, RPCError, EncodedMessage]) -> Tuple[bytes, List[bytes]]:
    """``(header, payload parts)`` of the frame for a message (``RPCError`` gets the error marker)."""
    if isinstance(message, RPCError):
        marker, parts = ERROR_MARKER, [message.SerializeToString()]
    elif isinstance(message, EncodedMessage):
        marker, parts = MESSAGE_MARKER, message.parts
    else:
        marker, parts = MESSAGE_MARKER, serialize_in_parts(message)  # a large bytes field is copied once, not twice
    return encode_header(marker, sum(map(len, parts))), parts


def encode_frame(message: Union[Message, RPCError]) -> bytes:
    """A complete frame for a message (``RPCError`` gets the error marker)."""
    header, parts = _frame_parts(message)
    return header + b"".join(parts)


def _write_prefixed(writer: asyncio.StreamWriter, prefix: bytes, parts: Sequence[bytes]) -> None:
    """Write a header and its payload parts: small pieces joined, large parts as writes of their own (no copy)."""
    pending = prefix
    for part in parts:
        if len(part) < JOIN_WRITE_THRESHOLD:
            pending += part
            continue
        if pending:
            writer.write(pending)
        writer.write(part)
        pending = b""
    if pending:
        writer.write(pending)


async def send_raw_data(
    data: bytes, writer: asyncio.StreamWriter, *, drain: bool = True, chunk_size: Optional[int] = None
) -> None:
    """Write ``data`` prefixed with its 8-byte big-endian length.

    :param chunk_size: accepted for hivemind 1.1.12's callers; it changes nothing (the transport splits the data)
    """
    _write_prefixed(writer, len(data).to_bytes(HEADER_LEN, BYTEORDER), [data])
    if drain:
        await writer.drain()


async def receive_raw_data(reader: asyncio.StreamReader, max_size: Optional[int] = None) -> Payload:
    """Read one 8-byte-length-prefixed payload (``MessageTooLargeError`` above ``max_size`` bytes, if given).

    The payload is collected as it arrives, so an announced length alone takes no memory.
    """
    length = decode_length(await reader.readexactly(HEADER_LEN))
    _check_size(length, max_size)
    return await reader.readexactly(length)


def _check_size(length: int, max_size: Optional[int]) -> None:
    if max_size is not None and length > max_size:
        raise MessageTooLargeError(
            f"A peer announced a {length}-byte message, more than the {max_size} bytes accepted here; the stream is "
            "dropped (pass a larger max_message_size to the handler or call if such messages are expected)"
        )


async def send_protobuf(protobuf: Union[Message, RPCError], writer: asyncio.StreamWriter) -> None:
    """Write one frame: ``0x00`` + message, or ``0x01`` + ``RPCError``."""
    _write_prefixed(writer, *_frame_parts(protobuf))
    await writer.drain()


async def send_protobuf_in_time(
    message: Union[Message, RPCError, EncodedMessage], writer: asyncio.StreamWriter
) -> None:
    """``send_protobuf`` to a peer that must keep reading: ``WriteStalledError`` if the frame (with what was written
    before it) is not taken within FRAME_STALL_TIMEOUT seconds plus one second per MIN_FRAME_RATE bytes of it.

    A peer that stops reading would otherwise hold the writer, and every message it has written, for as long as it
    keeps the stream open. The caller of this should abort the stream on the error: the frame may be half written.
    """
    header, parts = _frame_parts(message)
    _write_prefixed(writer, header, parts)
    if not getattr(writer.transport.get_protocol(), "_writing_paused", True):  # a DirectReadProtocol that is not
        await writer.drain()  # paused: drain() returns at once (and raises if the stream broke), no timer is needed
        return
    seconds = stall_bound(len(header) + sum(map(len, parts)))
    try:
        await await_with_timeout(writer.drain(), seconds)
    except asyncio.TimeoutError:
        raise WriteStalledError(
            f"A peer did not read a frame written to it within {seconds:.0f} s; the stream is dropped"
        ) from None


async def receive_protobuf(
    input_protobuf_type: Type[MessageType],
    reader: asyncio.StreamReader,
    max_message_size: Optional[int] = DEFAULT_MAX_MESSAGE_SIZE,
    *,
    idle_timeout: Optional[float] = None,
    admit: Optional[Callable[[int], AsyncContextManager]] = None,
) -> Tuple[Optional[MessageType], Optional[RPCError]]:
    """Read one frame: ``(message, None)`` for a message frame, ``(None, RPCError)`` for an error frame.

    The payload buffer grows only as bytes arrive (see ``streams.DirectStreamReader``), and a frame that announces
    more than ``max_message_size`` bytes (None: no limit but the 2 GiB protobuf limit) is refused at once.

    :param idle_timeout: seconds the frame may take to start (None: wait as long as the peer likes)
    :param admit: ``admit(length)`` is entered once the header passed the size check and left once the payload was
        read (or failed): a stream handler's share of its ``InboundBudget``, which may refuse the frame
    :raises asyncio.IncompleteReadError: the stream ended cleanly between frames
    :raises MessageTooLargeError: the frame announces more than ``max_message_size`` bytes
    :raises FramingError: unknown marker, impossible length, or the stream ended inside a frame
    :raises InboundBudgetExceeded: ``admit`` refused the frame (a ``FramingError``)
    """
    first_byte = reader.readexactly(1)  # IncompleteReadError with nothing read: the stream ended between frames
    if idle_timeout is not None and not _holds(reader, 1):
        first_byte = _in_time(first_byte, idle_timeout, "start")
    first_byte = await first_byte
    try:
        rest = reader.readexactly(FRAME_HEADER_LEN - 1)
        if not _holds(reader, FRAME_HEADER_LEN - 1):  # already received: nothing to wait for (no timer)
            rest = _in_time(rest, FRAME_STALL_TIMEOUT, "header")
        header = first_byte + await rest
    except asyncio.IncompleteReadError as e:
        got = 1 + len(e.partial)
        raise FramingError(f"Stream closed inside a frame header ({got} of {FRAME_HEADER_LEN} bytes)") from None
    marker, length = decode_header(header)
    _check_size(length, max_message_size)
    async with admit(length) if admit is not None and length else contextlib.nullcontext():
        payload = await _read_payload(reader, length)
    if marker == MESSAGE_MARKER:
        message = input_protobuf_type()
        message.ParseFromString(payload)
        return message, None
    error = RPCError()
    error.ParseFromString(payload)
    return None, error


async def _read_payload(reader: asyncio.StreamReader, length: int) -> Payload:
    read_payload = getattr(reader, "read_payload", reader.readexactly)  # no intermediate copies when available
    try:
        if length and _holds(reader, length):
            return await read_payload(length)  # already received: nothing to wait for
        elif length:
            return await _in_time(read_payload(length), stall_bound(length), "payload")
        return b""
    except asyncio.IncompleteReadError as e:
        raise FramingError(f"Stream closed inside a frame ({len(e.partial)} of {length} payload bytes)") from None


def _holds(reader: asyncio.StreamReader, n: int) -> bool:
    """Whether ``reader`` already holds ``n`` bytes, so that reading them cannot wait (and needs no timer)."""
    buffer = getattr(reader, "_buffer", None)
    return buffer is not None and len(buffer) >= n


async def _in_time(read: Awaitable[bytes], seconds: float, part: str) -> bytes:
    """Await ``read``; a peer that leaves a started frame unfinished for ``seconds`` gets FramingError."""
    try:
        return await await_with_timeout(read, seconds)
    except asyncio.TimeoutError:
        raise FramingError(_stalled(part, seconds)) from None


def _stalled(part: str, seconds: float) -> str:
    if part == "start":
        return f"A peer sent no frame for {seconds:.0f} s where one was due; the stream is dropped"
    return f"A peer left a frame {part} unfinished for {seconds:.0f} s; the stream is dropped"
