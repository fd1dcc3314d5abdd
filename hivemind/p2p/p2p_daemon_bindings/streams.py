"""asyncio streams over unix sockets that can receive a large payload straight into its final buffer.

``asyncio.StreamReader`` copies every received chunk into its internal buffer and copies again when a read
returns. ``DirectStreamReader.read_payload(n)`` instead lets the transport write the next ``n`` bytes directly
into the buffer that is returned (the protocol is an ``asyncio.BufferedProtocol``), which is what moving
megabyte-sized messages needs. Everything else behaves exactly like the standard reader and writer.

``n`` comes from the peer, so the buffer never takes memory for bytes that did not arrive: it starts small and
grows (by ``GROWTH_FACTOR``, copying what it holds) as it fills, and from ``LAZY_MAPPING_MIN_BYTES`` on it is an
anonymous memory map of all ``n`` bytes whose pages the kernel backs only once bytes land in them (no copies).
A peer that announces a gigabyte and sends nothing costs a few kilobytes. A transport that knows how many bytes have
arrived and wait to be taken (the shared-memory pipe: ``ARRIVED_BYTES_HINT``) passes that count to ``get_buffer``,
and the buffer then grows to hold them at once (one allocation, no copies as it fills). Buffers are not zero-filled:
every byte of them is written by the transport before the payload is returned.
"""

import asyncio
import mmap
import select
import threading
from typing import Awaitable, Callable, List, Optional, Tuple, Union

import numpy as np

# below this size a payload is read the ordinary way (one small copy is cheaper than the bookkeeping)
DIRECT_READ_MIN_BYTES = 64 * 1024
# a payload buffer starts this large (or as large as the bytes already received) and grows as bytes arrive
GROWING_BUFFER_START_BYTES = 64 * 1024
GROWTH_FACTOR = 4  # the bytes copied while growing add up to at most a third of the payload
# from this size on, a payload is received into an anonymous memory map of its full size: untouched pages take no
# memory, and glibc would map a buffer of this size afresh anyway (its largest dynamic mmap threshold)
LAZY_MAPPING_MIN_BYTES = 32 * 1024 * 1024
# receive buffer for ordinary reads (headers, control messages); one per thread, shared by all its connections
SCRATCH_BUFFER_BYTES = 64 * 1024
# right after a large payload the next bytes are most likely the header of another one: read only this much, so
# that the next payload goes to its own buffer instead of through the scratch buffer (two extra copies)
BOUNDARY_READ_BYTES = 256
# a transport whose get_buffer(sizehint) passes the number of bytes that arrived and wait to be taken sets this
# attribute to True (a socket transport's hint is only the size of the read it is about to try)
ARRIVED_BYTES_HINT = "get_buffer_hint_is_arrived_bytes"

ConnectedCallback = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]

_thread_buffers = threading.local()


def _scratch_buffers() -> Tuple[memoryview, memoryview]:
    """This thread's ``(scratch, boundary scratch)`` receive buffers.

    A transport calls ``buffer_updated`` right after ``get_buffer`` and ``feed_data`` copies the bytes out at once,
    so every connection of an event loop can receive ordinary reads into the same buffers: a connection costs no
    64 KiB of its own (a remote peer that opens many idle streams would otherwise make the process commit them).
    """
    buffers = getattr(_thread_buffers, "buffers", None)
    if buffers is None:
        buffers = _thread_buffers.buffers = (
            memoryview(bytearray(SCRATCH_BUFFER_BYTES)),
            memoryview(bytearray(BOUNDARY_READ_BYTES)),
        )
    return buffers


class DirectStreamReader(asyncio.StreamReader):
    """A ``StreamReader`` with ``read_payload(n)``: like ``readexactly(n)`` but without intermediate copies."""

    def __init__(self, limit: int, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(limit=limit, loop=loop)
        self._direct_view: Optional[memoryview] = None  # the buffer of the unfinished read_payload()
        self._direct_filled = 0
        self._direct_size = 0  # the payload length that read_payload() waits for (the buffer may still be smaller)
        self._direct_waiter: Optional[asyncio.Future] = None
        self._after_direct_read = False  # the last received bytes completed a read_payload()

    async def read_payload(self, n: int) -> Union[bytes, bytearray, memoryview]:
        """Read exactly ``n`` bytes; ``IncompleteReadError`` on EOF.

        Large payloads come back as a writable ``memoryview`` of their own buffer (from ``LAZY_MAPPING_MIN_BYTES`` on,
        of an anonymous memory map), freed with the last reference to it. Memory is only taken as bytes arrive.
        """
        if n < DIRECT_READ_MIN_BYTES or len(self._buffer) >= n or self._exception is not None or self._eof:
            return await self.readexactly(n)
        if self._direct_waiter is not None:
            raise RuntimeError("read_payload() called while another coroutine is already reading")
        already = len(self._buffer)
        if n >= LAZY_MAPPING_MIN_BYTES:
            view = memoryview(mmap.mmap(-1, n))
        else:
            view = _uninitialized(already)  # allocated on the first bytes (get_buffer): their count may be known
        view[:already] = self._buffer
        self._buffer.clear()
        self._direct_view, self._direct_filled, self._direct_size = view, already, n
        self._direct_waiter = self._loop.create_future()
        self._maybe_resume_transport()
        try:
            await self._direct_waiter
        except BaseException:
            # cancelled or failed: keep the bytes that did arrive so that the stream stays consistent
            self._buffer[0:0] = self._direct_view[: self._direct_filled]
            raise
        finally:
            view, self._direct_view, self._direct_waiter = self._direct_view, None, None
        return view

    def _direct_read_pending(self) -> bool:
        """Whether received bytes belong to an unfinished ``read_payload`` (then they go to its buffer)."""
        return self._direct_view is not None and self._direct_filled < self._direct_size

    def _direct_buffer(self, arrived: int = 0) -> memoryview:
        """Where the next received bytes go: the free part of the payload buffer, grown first if it is full or if
        the transport says that more than its free part has ``arrived`` already."""
        filled, capacity = self._direct_filled, len(self._direct_view)
        if filled == capacity:
            size = max(filled + arrived, GROWTH_FACTOR * filled, GROWING_BUFFER_START_BYTES)
        else:
            size = filled + arrived
        if size > capacity:
            grown = _uninitialized(min(self._direct_size, size))
            grown[:filled] = self._direct_view[:filled]
            self._direct_view = grown
        return self._direct_view[filled:]

    def _direct_data_received(self, nbytes: int) -> None:
        self._direct_filled += nbytes
        if self._direct_filled == self._direct_size:
            self._after_direct_read = True
            if not self._direct_waiter.done():
                self._direct_waiter.set_result(None)

    def _pause_until_read(self) -> None:
        """Stop receiving until a read consumes what is buffered (``StreamReader`` resumes the transport then)."""
        if self._paused or self._transport is None or self._transport.is_closing():
            return
        try:
            self._transport.pause_reading()
        except (NotImplementedError, RuntimeError):  # no flow control, or uvloop's "already paused / closing"
            return
        self._paused = True

    def feed_eof(self) -> None:
        super().feed_eof()
        if self._direct_waiter is not None and not self._direct_waiter.done():
            partial = bytes(self._direct_view[: self._direct_filled])
            self._direct_waiter.set_exception(asyncio.IncompleteReadError(partial, self._direct_size))

    def set_exception(self, exc: BaseException) -> None:
        super().set_exception(exc)
        if self._direct_waiter is not None and not self._direct_waiter.done():
            self._direct_waiter.set_exception(exc)


def _uninitialized(size: int) -> memoryview:
    """A writable byte buffer of ``size`` bytes with undefined contents (no zero-filling pass, unlike bytearray)."""
    return memoryview(np.empty(size, dtype=np.uint8))


class DirectReadProtocol(asyncio.BufferedProtocol):
    """The protocol behind a ``DirectStreamReader`` and its ``asyncio.StreamWriter``.

    It is a plain ``BufferedProtocol`` (uvloop only uses ``get_buffer`` for protocols that are not also an
    ``asyncio.Protocol``) and provides what ``StreamWriter`` expects: write flow control (``_drain_helper``) and
    a close waiter. With ``client_connected_cb`` it runs ``client_connected_cb(reader, writer)`` as a task.
    """

    def __init__(
        self,
        reader: DirectStreamReader,
        client_connected_cb: Optional[ConnectedCallback] = None,
        loop: Optional[asyncio.AbstractEventLoop] = None,
    ) -> None:
        self._loop = loop if loop is not None else asyncio.get_running_loop()
        self._reader = reader
        self._client_connected_cb = client_connected_cb
        self._writing_paused = False
        self._connection_lost = False
        self._drain_waiters: List[asyncio.Future] = []
        self._closed = self._loop.create_future()
        self._task: Optional[asyncio.Task] = None

    # ---------------------------------------------------------------- connection

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._reader.set_transport(transport)
        if self._client_connected_cb is not None:
            writer = asyncio.StreamWriter(transport, self, self._reader, self._loop)
            self._task = self._loop.create_task(self._client_connected_cb(self._reader, writer))
            self._task.add_done_callback(lambda task: task.cancelled() or task.exception() and transport.close())

    def connection_lost(self, exc: Optional[Exception]) -> None:
        if exc is None:
            self._reader.feed_eof()
        else:
            self._reader.set_exception(exc)
        if not self._closed.done():
            if exc is None:
                self._closed.set_result(None)
            else:
                self._closed.set_exception(exc)
                self._closed.exception()  # mark retrieved: nobody may wait for it
        self._connection_lost = True
        for waiter in self._drain_waiters:
            if not waiter.done():
                if exc is None:
                    waiter.set_result(None)
                else:
                    waiter.set_exception(exc)

    def eof_received(self) -> bool:
        self._reader.feed_eof()
        return True  # keep the transport open: this side may still be writing

    # ---------------------------------------------------------------- receiving

    # the transport calls buffer_updated right after get_buffer, so both see the same reader state
    def get_buffer(self, sizehint: int) -> memoryview:
        reader = self._reader
        if reader._direct_read_pending():
            arrived = sizehint if getattr(reader._transport, ARRIVED_BYTES_HINT, False) else 0
            return reader._direct_buffer(max(arrived, 0))
        scratch, boundary_scratch = _scratch_buffers()
        return boundary_scratch if reader._after_direct_read else scratch

    def buffer_updated(self, nbytes: int) -> None:
        reader = self._reader
        if reader._direct_read_pending():
            reader._direct_data_received(nbytes)
        elif reader._after_direct_read:
            # a short read after a large payload: if more bytes are waiting, let the reader see this header first,
            # so that a following large payload is received straight into its own buffer
            reader._after_direct_read = False
            reader.feed_data(_scratch_buffers()[1][:nbytes])
            if nbytes == BOUNDARY_READ_BYTES:
                reader._pause_until_read()
        else:
            reader.feed_data(_scratch_buffers()[0][:nbytes])

    # ---------------------------------------------------------------- sending (what StreamWriter relies on)

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def _drain_helper(self) -> None:
        if self._connection_lost:
            raise ConnectionResetError("Connection lost")
        if not self._writing_paused:
            return
        waiter = self._loop.create_future()
        self._drain_waiters.append(waiter)
        try:
            await waiter
        finally:
            self._drain_waiters.remove(waiter)

    def _get_close_waiter(self, stream: asyncio.StreamWriter) -> asyncio.Future:
        return self._closed


def peer_closed_completely(writer: asyncio.StreamWriter) -> bool:
    """Whether the other end of this socket is closed in both directions (or the state cannot be told).

    A peer that only ended its writing (a half-close) keeps the socket open for reading, and ``poll`` then reports
    no hang-up; a peer process that closed the socket, or exited, does.
    """
    sock = writer.transport.get_extra_info("socket")
    fileno = -1 if sock is None else sock.fileno()
    if fileno < 0 or not hasattr(select, "poll"):
        return True
    poller = select.poll()
    poller.register(fileno, select.POLLIN)
    return any(events & (select.POLLHUP | select.POLLERR | select.POLLNVAL) for _, events in poller.poll(0))


async def close_when_sent(writer: asyncio.StreamWriter, timeout: Optional[float]) -> None:
    """Close ``writer`` once what was written to it has been sent, waiting at most ``timeout`` seconds (None: do not
    wait); then abort it, dropping the rest. A transport closed with bytes left keeps its connection open until they
    are sent: a peer that never reads them would hold it (and them) for as long as it likes."""
    writer.close()
    if not writer.transport.get_write_buffer_size():
        return
    try:
        close_waiter = getattr(writer.transport.get_protocol(), "_get_close_waiter", None)
        if timeout is not None and close_waiter is not None:
            await asyncio.wait({close_waiter(writer)}, timeout=timeout)  # (leaves the future to other waiters)
    finally:
        writer.transport.abort()  # (nothing to do if it closed meanwhile)


async def open_unix_connection(path: str, *, limit: int) -> Tuple[DirectStreamReader, asyncio.StreamWriter]:
    """Like ``asyncio.open_unix_connection``, with a ``DirectStreamReader``."""
    loop = asyncio.get_running_loop()
    reader = DirectStreamReader(limit=limit, loop=loop)
    protocol = DirectReadProtocol(reader, loop=loop)
    transport, _ = await loop.create_unix_connection(lambda: protocol, path)
    return reader, asyncio.StreamWriter(transport, protocol, reader, loop)


async def start_unix_server(callback: ConnectedCallback, path: str, *, limit: int) -> asyncio.AbstractServer:
    """Like ``asyncio.start_unix_server``, with a ``DirectStreamReader`` for every connection."""
    loop = asyncio.get_running_loop()

    def make_protocol() -> DirectReadProtocol:
        return DirectReadProtocol(DirectStreamReader(limit=limit, loop=loop), callback, loop=loop)

    return await loop.create_unix_server(make_protocol, path)
