"""Stream bytes through shared memory instead of the unix socket to p2pd (a hivemind extension of the protocol).

A client that asks for it (``shm_capable``) is offered a pipe file in the StreamInfo of each stream; see
``p2pd/shmpipe.go`` for the whole protocol. After the client answers ``S``, the file holds two rings (client ->
daemon, then daemon -> client) and the socket carries only 9-byte records: ``D n`` (n more bytes are in the sender's
ring), ``A n`` (the receiver is done with n bytes of the sender's ring) and ``E`` (the sender's direction ended).
Each stream byte then costs one copy in this process instead of two kernel copies and the system calls around them.

``ShmPipeTransport`` is an ``asyncio.Transport`` over such a pipe, so the stream reader, writer and protocol above it
work exactly as on a socket; ``accept_shm_pipe`` answers an offer and swaps the transport under them.

Touching fresh shared memory costs a page fault per page, so p2pd reuses the files of finished pipes and this module
keeps its mappings of them (a few, least recently used first out).

Pipe files live on a tmpfs (``/dev/shm``, or ``HIVEMIND_P2P_SHM_DIR``, which the daemon started by this process
inherits). A tmpfs page that cannot be backed when it is touched raises SIGBUS, so p2pd reserves every page of a
file before offering it, and this module declines any offered file whose pages are not all allocated.
"""

import asyncio
import glob
import mmap
import os
import struct
import sys
from collections import OrderedDict, deque
from typing import Any, Deque, Optional, Tuple

from hivemind.proto import p2pd_pb2
from hivemind.utils.logging import get_logger

logger = get_logger(__name__)

SHM_ENV_VAR = "HIVEMIND_P2P_SHM"  # "0" turns shared-memory pipes off (every stream then uses its socket)
SHM_DIR_ENV_VAR = "HIVEMIND_P2P_SHM_DIR"  # directory of the pipe files (a tmpfs), read by p2pd too; /dev/shm if unset
RECORD = struct.Struct("<cQ")
DATA, ACK, EOF = b"D", b"A", b"E"
ACCEPT, DECLINE = b"S", b"P"
PIPE_DIR = "/dev/shm/"  # the default directory of the pipe files
PIPE_NAME_PREFIX = "hivemind-p2pd-"
MIN_RING_SIZE, MAX_RING_SIZE = 4096, 1 << 30
MAX_IDLE_MAPPINGS = 4  # mappings of pipe files that no stream uses now, kept for p2pd to offer again

_idle_mappings: "OrderedDict[str, mmap.mmap]" = OrderedDict()


def pipe_dir() -> str:
    """The directory of p2pd's pipe files, with a trailing slash."""
    directory = os.environ.get(SHM_DIR_ENV_VAR)
    return os.path.normpath(directory) + "/" if directory else PIPE_DIR


def shm_pipes_enabled() -> bool:
    """Whether this client asks p2pd for shared-memory pipes (Linux only; ``HIVEMIND_P2P_SHM=0`` turns them off)."""
    return sys.platform.startswith("linux") and os.environ.get(SHM_ENV_VAR, "1") != "0"


class ShmPipeError(ConnectionError):
    """p2pd broke the shared-memory pipe protocol (the stream is aborted)."""


def map_pipe_file(path: str, ring_size: int) -> mmap.mmap:
    """Map a pipe file that p2pd offered, after checking that it is one: a file of this user, of the right size, in
    the pipe directory, with every page allocated (touching a page a full tmpfs cannot back would raise SIGBUS)."""
    if not (MIN_RING_SIZE <= ring_size <= MAX_RING_SIZE):
        raise ValueError(f"Shared-memory pipe ring size {ring_size} is out of range")
    directory = pipe_dir()
    if not path.startswith(directory + PIPE_NAME_PREFIX) or "/" in path[len(directory) :]:
        raise ValueError(f"Unexpected shared-memory pipe path {path!r} (pipe files are expected in {directory})")
    fd = os.open(path, os.O_RDWR | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        stat = os.fstat(fd)
        if stat.st_uid != os.getuid() or stat.st_size != 2 * ring_size:
            raise ValueError(f"Shared-memory pipe {path!r} has the wrong owner or size")
        if stat.st_blocks * 512 < 2 * ring_size:
            raise ValueError(
                f"Shared-memory pipe {path!r} is not fully reserved ({stat.st_blocks * 512} of {2 * ring_size} "
                "bytes allocated): a page the tmpfs cannot back would raise SIGBUS, so the stream keeps its socket"
            )
        return mmap.mmap(fd, 2 * ring_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)


def _take_mapping(path: str, ring_size: int) -> mmap.mmap:
    memory = _idle_mappings.pop(path, None)
    if memory is not None:
        if len(memory) == 2 * ring_size:
            return memory
        memory.close()
    return map_pipe_file(path, ring_size)


def _keep_mapping(path: str, memory: mmap.mmap) -> None:
    # event loops of several threads (a server's handler, a client) release theirs here at once: each pop may find
    # that another thread took the entry first (single dict operations are atomic; no lock, so forks are safe)
    _idle_mappings[path] = memory
    for cached_path in list(_idle_mappings):
        if not os.path.exists(cached_path):  # p2pd dropped this pipe (or exited): do not pin its memory
            dropped = _idle_mappings.pop(cached_path, None)
            if dropped is not None:
                dropped.close()
    while len(_idle_mappings) > MAX_IDLE_MAPPINGS:
        try:
            _, oldest = _idle_mappings.popitem(last=False)
        except KeyError:
            break
        oldest.close()


def remove_daemon_pipe_files(daemon_pid: int) -> None:
    """Remove the pipe files of a p2pd that exited (it removes them itself unless it was killed)."""
    for path in glob.glob(f"{glob.escape(pipe_dir())}{PIPE_NAME_PREFIX}{int(daemon_pid)}-*"):
        try:
            os.unlink(path)
        except OSError:
            pass


def _require_buffered(protocol: asyncio.BaseProtocol) -> asyncio.BufferedProtocol:
    """The pipe copies ring bytes straight into the protocol's buffers, so it takes only a ``BufferedProtocol``."""
    if not isinstance(protocol, asyncio.BufferedProtocol):
        raise TypeError(f"A shared-memory pipe needs an asyncio.BufferedProtocol, got {type(protocol).__name__}")
    return protocol


class _RecordProtocol(asyncio.Protocol):
    """Protocol of the socket under a ``ShmPipeTransport``: splits the records and hands them over."""

    def __init__(self, pipe: "ShmPipeTransport") -> None:
        self._pipe = pipe
        self._buffer = bytearray()

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        size = RECORD.size
        count = len(self._buffer) // size
        for index in range(count):
            kind, value = RECORD.unpack_from(self._buffer, index * size)
            if not self._pipe._on_record(kind, value):
                return
        del self._buffer[: count * size]
        self._pipe._after_records()

    def eof_received(self) -> bool:
        return False  # p2pd closed the socket: the transport closes, connection_lost follows

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self._pipe._on_socket_lost(exc)


class ShmPipeTransport(asyncio.Transport):
    """The bytes of one stream through the rings of a pipe file; records go through ``socket_transport``."""

    # get_buffer(sizehint) is called with the number of bytes that are in the ring (see streams.ARRIVED_BYTES_HINT)
    get_buffer_hint_is_arrived_bytes = True

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        socket_transport: asyncio.Transport,
        path: str,
        memory: mmap.mmap,
        ring_size: int,
        protocol: asyncio.BufferedProtocol,
    ) -> None:
        super().__init__()
        self._loop = loop
        self._socket = socket_transport
        self._path, self._memory = path, memory
        view = memoryview(memory)
        self._out, self._in = view[:ring_size], view[ring_size:]
        self._size = ring_size
        self._protocol = _require_buffered(protocol)

        self._out_written = self._out_acked = 0  # bytes put into the out ring / acknowledged by p2pd (totals)
        self._pending: Deque[memoryview] = deque()  # written, not yet in the ring
        self._pending_size = 0
        self._high_water, self._low_water = 1 << 16, 1 << 14
        self._writing_paused = False
        self._eof_requested = self._eof_sent = False

        self._in_announced = self._in_consumed = 0  # bytes p2pd put into the in ring / this side consumed (totals)
        self._in_ended = self._eof_delivered = False
        self._reading_paused = False
        self._delivery_scheduled = False
        self._flush_due = self._delivery_due = False  # records applied, acted on by _after_records

        self._closing = False
        self._closed_here = False  # this side closed the socket, and before p2pd did: the pipe can be reused
        self._lost = False  # the socket is gone
        self._lost_exc: Optional[Exception] = None
        self._lost_reported = False

    # ---------------------------------------------------------------- records from p2pd

    def _on_record(self, kind: bytes, value: int) -> bool:
        """Apply one record (its effect waits for ``_after_records``); False (after aborting the stream) for a
        record that breaks the protocol."""
        if kind == ACK:
            if not 0 < value <= self._out_written - self._out_acked:
                return self._protocol_error(f"acknowledged {value} of {self._out_written - self._out_acked} bytes")
            self._out_acked += value
            self._flush_due = True
        elif kind == DATA:
            in_use = self._in_announced - self._in_consumed
            if self._in_ended or not 0 < value <= self._size - in_use:
                return self._protocol_error(f"announced {value} bytes with {in_use} of {self._size} in use")
            self._in_announced += value
            self._delivery_due = True
        elif kind == EOF:
            self._in_ended = True
            self._delivery_due = True
        else:
            return self._protocol_error(f"unknown record type {kind!r}")
        return True

    def _after_records(self) -> None:
        """Act on the records read at once: p2pd sends one per chunk it moves, so that a batch of them costs one
        flush (and one DATA record back) and one delivery (and one ACK record back) instead of one each."""
        if self._flush_due:
            self._flush_due = False
            self._flush()
        if self._delivery_due:
            self._delivery_due = False
            self._deliver()

    def _protocol_error(self, what: str) -> bool:
        self._lost_exc = ShmPipeError(f"p2pd broke the shared-memory pipe protocol: {what}")
        logger.debug(str(self._lost_exc))
        self._closing = True  # the rings are not touched again
        self._socket.abort()
        return False

    def _on_socket_lost(self, exc: Optional[Exception]) -> None:
        if isinstance(exc, (BrokenPipeError, ConnectionResetError)):
            exc = None  # p2pd closed the socket while a record was on its way: an end, as EOF on a plain socket
        self._closed_here = self._closing and exc is None and self._lost_exc is None
        self._lost = True
        if self._lost_exc is None:
            self._lost_exc = exc
        self._pending.clear()
        self._pending_size = 0
        if self._writing_paused:
            self._writing_paused = False
            self._protocol.resume_writing()
        self._deliver()

    # ---------------------------------------------------------------- receiving

    def _deliver(self) -> None:
        """Hand announced bytes to the protocol while it reads; then EOF and connection loss, in that order.

        Once the socket is gone, everything announced is handed over at once, even while reading is paused (a
        ``StreamReader`` buffers it): the rings must not be touched later, and the loss must be reported now.
        """
        consumed = 0
        while (
            (not self._reading_paused or self._lost) and not self._closing and self._in_consumed < self._in_announced
        ):
            start = self._in_consumed % self._size
            chunk = min(self._in_announced - self._in_consumed, self._size - start)
            buffer = self._protocol.get_buffer(chunk)
            chunk = min(chunk, len(buffer))
            buffer[:chunk] = self._in[start : start + chunk]
            self._in_consumed += chunk
            consumed += chunk
            self._protocol.buffer_updated(chunk)
        if consumed and not self._lost:
            self._socket.write(RECORD.pack(ACK, consumed))
        if self._in_consumed < self._in_announced and not self._closing:
            return  # paused with bytes left: resume_reading() continues
        clean_end = self._in_ended or (self._lost and self._lost_exc is None)
        if clean_end and not self._eof_delivered and not self._closing:
            self._eof_delivered = True
            if not self._protocol.eof_received():
                self.close()
        if self._lost and not self._lost_reported:
            self._lost_reported = True
            self._protocol.connection_lost(self._lost_exc)
            self._release()

    def _scheduled_delivery(self) -> None:
        self._delivery_scheduled = False
        self._deliver()

    def pause_reading(self) -> None:
        self._reading_paused = True

    def resume_reading(self) -> None:
        if self._reading_paused:
            self._reading_paused = False
            if not self._delivery_scheduled:
                self._delivery_scheduled = True
                self._loop.call_soon(self._scheduled_delivery)

    def is_reading(self) -> bool:
        return not self._reading_paused and not self._lost

    # ---------------------------------------------------------------- sending

    def write(self, data: Any) -> None:
        if self._eof_requested:
            raise RuntimeError("Cannot call write() after write_eof()")
        if self._lost or self._closing:
            return  # like a socket transport: drain() reports the lost connection
        view = memoryview(data).cast("B")
        if not view.nbytes:
            return
        self._pending.append(view)
        self._pending_size += view.nbytes
        self._flush()
        if self._pending:
            # the caller may reuse a mutable buffer once write() returns; a read-only one (bytes, a read-only
            # memoryview such as an EncodedMessage's view of a tensor) is its promise to leave the bytes unchanged
            if not view.readonly:
                self._pending[-1] = memoryview(bytes(self._pending[-1]))
            if self._pending_size > self._high_water and not self._writing_paused:
                self._writing_paused = True
                self._protocol.pause_writing()

    def writelines(self, list_of_data) -> None:
        for data in list_of_data:
            self.write(data)

    def _flush(self) -> None:
        """Move pending bytes into the free part of the out ring and announce them."""
        written = 0
        while self._pending:
            free = self._size - (self._out_written - self._out_acked)
            if free == 0:
                break
            view = self._pending[0]
            start = self._out_written % self._size
            chunk = min(view.nbytes, free, self._size - start)
            self._out[start : start + chunk] = view[:chunk]
            self._out_written += chunk
            written += chunk
            if chunk == view.nbytes:
                self._pending.popleft()
            else:
                self._pending[0] = view[chunk:]
            self._pending_size -= chunk
        if self._lost:
            return
        if written:
            self._socket.write(RECORD.pack(DATA, written))
        if self._writing_paused and self._pending_size <= self._low_water:
            self._writing_paused = False
            self._protocol.resume_writing()
        if not self._pending:
            if self._eof_requested and not self._eof_sent:
                self._eof_sent = True
                self._socket.write(RECORD.pack(EOF, 0))
            if self._closing:
                self._socket.close()

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        if self._eof_requested or self._closing:
            return
        self._eof_requested = True
        self._flush()

    def get_write_buffer_size(self) -> int:
        return self._pending_size

    def get_write_buffer_limits(self) -> Tuple[int, int]:
        return self._low_water, self._high_water

    def set_write_buffer_limits(self, high: Optional[int] = None, low: Optional[int] = None) -> None:
        if high is None:
            high = 4 * low if low is not None else 1 << 16
        if low is None:
            low = high // 4
        if not 0 <= low <= high:
            raise ValueError(f"high ({high!r}) must be >= low ({low!r}) must be >= 0")
        self._high_water, self._low_water = high, low

    # ---------------------------------------------------------------- lifetime

    def is_closing(self) -> bool:
        return self._closing or self._lost

    def close(self) -> None:
        """Close after the pending bytes went into the ring (as a socket transport flushes before closing)."""
        if self._closing:
            return
        self._closing = True
        if self._lost or not self._pending:
            self._socket.close()

    def abort(self) -> None:
        self._closing = True
        self._socket.abort()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "shm_pipe":
            return True
        return self._socket.get_extra_info(name, default)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = _require_buffered(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol

    def _release(self) -> None:
        """Let go of the rings: kept for reuse after a clean close by this side, unmapped otherwise."""
        self._pending.clear()
        self._out.release()
        self._in.release()
        if self._closed_here:
            _keep_mapping(self._path, self._memory)
            return
        try:
            self._memory.close()
        except BufferError:  # pragma: no cover - a view is still alive; the mapping goes with the object
            pass


def accept_shm_pipe(
    info: p2pd_pb2.StreamInfo, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> Tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Answer p2pd's pipe offer in ``info`` (if any): on success the returned writer and ``reader`` use the pipe.

    p2pd waits for the answer before it sends anything else, so nothing can be buffered in ``reader`` yet. If the
    pipe cannot be mapped the answer is ``P`` and the stream stays on its socket.
    """
    if not info.HasField("shm_path"):
        return reader, writer
    try:
        if len(reader._buffer) or reader.at_eof():
            raise ValueError("bytes arrived before the answer to a pipe offer")
        memory = _take_mapping(info.shm_path, info.shm_ring_size)
    except (OSError, ValueError) as e:
        logger.debug(f"Declining a shared-memory pipe: {e!r}")
        writer.write(DECLINE)
        return reader, writer
    writer.write(ACCEPT)
    socket_transport = writer.transport
    protocol = socket_transport.get_protocol()
    loop = asyncio.get_running_loop()
    pipe = ShmPipeTransport(loop, socket_transport, info.shm_path, memory, info.shm_ring_size, protocol)
    pipe._socket_writer = writer  # a StreamWriter closes its transport when collected: keep it while the pipe lives
    socket_transport.set_protocol(_RecordProtocol(pipe))
    reader._transport = pipe  # the reader pauses and resumes the pipe from now on
    if getattr(reader, "_paused", False):
        reader._paused = False
        socket_transport.resume_reading()
    return reader, asyncio.StreamWriter(pipe, protocol, reader, loop)
