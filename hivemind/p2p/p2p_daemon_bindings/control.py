"""Asyncio client of the p2pd control protocol: plain requests, stream handlers and unary RPCs."""

import asyncio
import logging
import os
import socket
from typing import Awaitable, Callable, Dict, List, Optional, Sequence, Set, Tuple

from hivemind.p2p import framing
from hivemind.p2p.p2p_daemon_bindings import shm_pipe, streams
from hivemind.p2p.p2p_daemon_bindings.datastructures import PeerID, PeerInfo, StreamInfo
from hivemind.p2p.p2p_daemon_bindings.persistent import PersistentConnection, UnaryHandler
from hivemind.p2p.p2p_daemon_bindings.utils import (
    DispatchFailure,
    P2PDaemonError,
    encode_varint,
    raise_if_failed,
    read_pbmsg_safe,
    write_pbmsg,
)
from hivemind.proto import p2pd_pb2
from hivemind.utils.asyncio import await_with_timeout
from hivemind.utils.logging import get_logger
from hivemind.utils.multiaddr import Multiaddr

logger = get_logger(__name__)

DEFAULT_MAX_MSG_SIZE = 4 * 1024**2
MAX_UNARY_PAYLOAD_SIZE = 2 * 1024**2  # MoE clients switch to streaming above this many bytes

# asyncio.StreamReader limit: the transport pauses once twice this much is buffered. Kept small on purpose:
# large payloads are received by read_payload() straight into their own buffer, and everything buffered ahead
# of such a read (the event loop reads ahead as long as data is available) would have to be copied once more
STREAM_READER_LIMIT = 2**16  # the asyncio default
# the transport's write buffer may grow this large before drain() blocks (lets big frames pipeline)
STREAM_WRITE_HIGH_WATER = 2**22
# kernel socket buffers for stream data sockets: fewer wake-ups for large transfers
SOCKET_BUFFER_SIZE = 2**22

# handler(stream_info, reader, writer), awaited until the stream is done
StreamCallback = Callable[[StreamInfo, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]

UNIX_PROTOCOL_CODE = 400


_CONNECTION_PROTOCOL_CODES = (4, UNIX_PROTOCOL_CODE)  # ip4, unix: what a daemon's control address may use


def parse_conn_protocol(maddr: Multiaddr) -> int:
    """The code of the one connection protocol (ip4 = 4 or unix = 400) in ``maddr``, e.g. a daemon's control
    address; ``ValueError`` if it has neither or both."""
    codes = [protocol.code for protocol in maddr.protocols() if protocol.code in _CONNECTION_PROTOCOL_CODES]
    if len(codes) != 1:
        raise ValueError(f"{maddr} must contain exactly one of the protocols ip4 or unix, found {len(codes)}")
    return codes[0]


def unix_socket_path(maddr: Multiaddr) -> str:
    """Filesystem path of a ``/unix/...`` multiaddr."""
    try:
        path = maddr.value_for_protocol("unix")
    except Exception as e:
        raise ValueError(f"Expected a /unix/... multiaddr for a p2pd socket, got {maddr}") from e
    return path if path.startswith("/") else "/" + path


def unix_maddr_bytes(path: str) -> bytes:
    """Binary multiaddr of a unix socket path as go-multiaddr encodes it (absolute path, leading slash kept)."""
    encoded = path.encode()
    return encode_varint(UNIX_PROTOCOL_CODE) + encode_varint(len(encoded)) + encoded


def tune_stream_transport(writer: asyncio.StreamWriter) -> None:
    """Raise socket buffers and the write high-water mark of a stream data connection (best effort)."""
    transport = writer.transport
    sock = transport.get_extra_info("socket")
    if sock is not None:
        for option in ("SO_SNDBUF", "SO_RCVBUF"):
            try:
                sock.setsockopt(socket.SOL_SOCKET, getattr(socket, option), SOCKET_BUFFER_SIZE)
            except OSError:  # pragma: no cover - platform-dependent
                pass
    try:
        transport.set_write_buffer_limits(high=STREAM_WRITE_HIGH_WATER)
    except (AttributeError, NotImplementedError):  # pragma: no cover
        pass


class DaemonConnector:
    """Opens connections to the daemon's control socket."""

    def __init__(self, control_maddr: Multiaddr, max_msg_size: int = DEFAULT_MAX_MSG_SIZE) -> None:
        self.control_maddr = control_maddr
        self.socket_path = unix_socket_path(control_maddr)
        self.max_msg_size = max_msg_size

    async def open_connection(self) -> Tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        try:
            return await streams.open_unix_connection(self.socket_path, limit=STREAM_READER_LIMIT)
        except OSError as e:
            raise P2PDaemonError(f"Cannot connect to p2pd at {self.control_maddr}: {e}") from e

    async def request(self, request: p2pd_pb2.Request) -> p2pd_pb2.Response:
        """Send one request on a fresh control connection and return the (successful) response."""
        response, _, writer = await self.request_keeping_connection(request, "before answering")
        writer.close()
        return response

    async def request_keeping_connection(
        self, request: p2pd_pb2.Request, purpose: str
    ) -> Tuple[p2pd_pb2.Response, asyncio.StreamReader, asyncio.StreamWriter]:
        """Send one request on a fresh control connection that stays open after a successful response (it then
        carries a stream or the persistent channel); on any failure the connection is closed. ``purpose`` (e.g.
        "while opening a stream") completes the error message when the daemon hangs up."""
        reader, writer = await self.open_connection()
        try:
            await write_pbmsg(writer, request)
            response = await read_pbmsg_safe(reader, p2pd_pb2.Response(), self.max_msg_size)
            raise_if_failed(response)
        except BaseException as e:
            writer.close()
            if isinstance(e, (asyncio.IncompleteReadError, ConnectionError)):
                raise P2PDaemonError(f"p2pd closed the connection {purpose}: {e!r}") from e
            raise
        return response, reader, writer


class ControlClient:
    """A client of one p2pd daemon: control requests, a callback socket for stream handlers, unary RPCs."""

    def __init__(
        self,
        connector: DaemonConnector,
        listen_maddr: Multiaddr,
        *,
        unary_max_msg_size: int = DEFAULT_MAX_MSG_SIZE,
        describe_connection_loss: Optional[Callable[[], Awaitable[str]]] = None,
    ) -> None:
        self.connector = connector
        self.listen_maddr = listen_maddr
        self.listen_path = unix_socket_path(listen_maddr)
        self.unary_max_msg_size = unary_max_msg_size
        self._describe_connection_loss = describe_connection_loss
        self._stream_handlers: Dict[str, StreamCallback] = {}
        self._server: Optional[asyncio.AbstractServer] = None
        self._handler_tasks: Set[asyncio.Task] = set()
        self._handler_writers: Set[asyncio.StreamWriter] = set()
        self._persistent: Optional[PersistentConnection] = None
        self._persistent_lock = asyncio.Lock()
        self._closed = False

    # ---------------------------------------------------------------- lifecycle

    async def listen(self) -> None:
        """Start serving the callback socket the daemon dials for incoming streams."""
        if self._server is not None:
            return
        if os.path.exists(self.listen_path):
            raise P2PDaemonError(f"Client callback socket {self.listen_path} already exists")
        self._server = await streams.start_unix_server(
            self._on_incoming_stream, self.listen_path, limit=STREAM_READER_LIMIT
        )

    async def open_persistent_connection(self) -> PersistentConnection:
        """Open (once) the persistent connection that carries unary RPCs; cancels the daemon's idle timer."""
        if self._persistent is not None:
            return self._persistent
        async with self._persistent_lock:
            if self._persistent is None:
                if self._closed:
                    raise P2PDaemonError("The p2pd client is closed")
                upgrade = p2pd_pb2.Request(type=p2pd_pb2.Request.PERSISTENT_CONN_UPGRADE)
                _, reader, writer = await self.connector.request_keeping_connection(upgrade, "during upgrade")
                self._persistent = PersistentConnection(
                    reader,
                    writer,
                    max_msg_size=self.unary_max_msg_size,
                    describe_connection_loss=self._describe_connection_loss,
                )
                self._persistent.start()
            return self._persistent

    @property
    def persistent_connection_alive(self) -> bool:
        return self._persistent is not None and self._persistent.is_alive

    @property
    def persistent_connection_failure(self) -> Optional[P2PDaemonError]:
        """The error that ended the persistent connection, if it was lost."""
        return None if self._persistent is None else self._persistent.failure

    async def close(self, unregister_stream_handlers: bool = False) -> None:
        """Close the persistent connection, stop serving streams and cancel running handlers. With
        ``unregister_stream_handlers`` (a client of a daemon that outlives it), then remove its stream handlers from
        the daemon (at most 1 s), as closing the persistent connection does for its unary handlers."""
        if self._closed:
            return
        self._closed = True
        if self._server is not None:
            self._server.close()  # p2pd now finds nobody here: it sends our streams to the next client, if any
        tasks = list(self._handler_tasks)
        for task in tasks:
            task.cancel()  # handlers get a chance to tell their callers (an error frame) before the streams close
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        for writer in list(self._handler_writers):
            writer.transport.abort()
        if self._persistent is not None:
            await self._persistent.close()  # the last persistent connection closing makes p2pd exit
        if self._server is not None:
            try:
                await await_with_timeout(self._server.wait_closed(), 1)
            except asyncio.TimeoutError:
                logger.debug("Callback server did not close within 1 s")
            self._server = None
        try:
            os.unlink(self.listen_path)
        except FileNotFoundError:
            pass
        if unregister_stream_handlers and self._stream_handlers:
            # last, so that a slow daemon (or a caller's bound on close) cannot keep the socket above open
            removals = asyncio.gather(
                *map(self.remove_stream_handler, list(self._stream_handlers)), return_exceptions=True
            )
            try:  # (a daemon that is gone answers at once; otherwise it forgets them as our socket is gone)
                await await_with_timeout(removals, 1)
            except asyncio.TimeoutError:
                logger.debug("p2pd did not confirm the removal of our stream handlers within 1 s")

    # ---------------------------------------------------------------- plain control requests

    async def identify(self) -> Tuple[PeerID, List[Multiaddr]]:
        response = await self.connector.request(p2pd_pb2.Request(type=p2pd_pb2.Request.IDENTIFY))
        return PeerID(response.identify.id), [Multiaddr(addr) for addr in response.identify.addrs]

    async def connect(self, peer_id: PeerID, maddrs: Sequence[Multiaddr], timeout: Optional[int] = None) -> None:
        connect_request = p2pd_pb2.ConnectRequest(peer=peer_id.to_bytes(), addrs=[m.to_bytes() for m in maddrs])
        if timeout is not None:
            connect_request.timeout = int(timeout)
        await self.connector.request(p2pd_pb2.Request(type=p2pd_pb2.Request.CONNECT, connect=connect_request))

    async def disconnect(self, peer: PeerID) -> None:
        request = p2pd_pb2.Request(
            type=p2pd_pb2.Request.DISCONNECT, disconnect=p2pd_pb2.DisconnectRequest(peer=peer.to_bytes())
        )
        await self.connector.request(request)

    async def list_peers(self) -> List[PeerInfo]:
        response = await self.connector.request(p2pd_pb2.Request(type=p2pd_pb2.Request.LIST_PEERS))
        return [PeerInfo.from_protobuf(peer_info) for peer_info in response.peers]

    # ---------------------------------------------------------------- streams

    async def stream_open(
        self, peer_id: PeerID, protocols: Sequence[str], timeout: Optional[int] = None
    ) -> Tuple[StreamInfo, asyncio.StreamReader, asyncio.StreamWriter]:
        """Open a libp2p stream to ``peer_id``; the returned reader/writer carry the raw stream bytes."""
        stream_open_request = p2pd_pb2.StreamOpenRequest(peer=peer_id.to_bytes(), proto=list(protocols))
        if timeout is not None:
            stream_open_request.timeout = int(timeout)
        if shm_pipe.shm_pipes_enabled():
            stream_open_request.shm_capable = True
        request = p2pd_pb2.Request(type=p2pd_pb2.Request.STREAM_OPEN, streamOpen=stream_open_request)
        response, reader, writer = await self.connector.request_keeping_connection(request, "while opening a stream")
        reader, writer = shm_pipe.accept_shm_pipe(response.streamInfo, reader, writer)
        tune_stream_transport(writer)
        return StreamInfo.from_protobuf(response.streamInfo), reader, writer

    async def stream_handler(self, proto: str, handler: StreamCallback, balanced: bool = False) -> None:
        """Ask the daemon to forward incoming streams of protocol ``proto`` to this client's callback socket."""
        request = p2pd_pb2.Request(
            type=p2pd_pb2.Request.STREAM_HANDLER,
            streamHandler=p2pd_pb2.StreamHandlerRequest(
                addr=unix_maddr_bytes(self.listen_path), proto=[proto], balanced=balanced
            ),
        )
        if shm_pipe.shm_pipes_enabled():
            request.streamHandler.shm_capable = True
        await self.connector.request(request)
        self._stream_handlers[proto] = handler

    async def remove_stream_handler(self, protocol: str) -> None:
        request = p2pd_pb2.Request(
            type=p2pd_pb2.Request.REMOVE_STREAM_HANDLER,
            removeStreamHandler=p2pd_pb2.RemoveStreamHandlerRequest(
                addr=unix_maddr_bytes(self.listen_path), proto=[protocol]
            ),
        )
        await self.connector.request(request)
        self._stream_handlers.pop(protocol, None)

    async def _on_incoming_stream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._closed:  # accepted while close() ran: it no longer cancels or awaits tasks that start now
            writer.close()
            return
        task = asyncio.current_task()
        self._handler_tasks.add(task)
        self._handler_writers.add(writer)
        cancelled = False
        try:
            try:
                info_message = await read_pbmsg_safe(reader, p2pd_pb2.StreamInfo(), self.connector.max_msg_size)
                stream_info = StreamInfo.from_protobuf(info_message)
            except Exception as e:
                logger.debug(f"Dropping an incoming stream with an unreadable StreamInfo: {e!r}")
                return
            handler = self._stream_handlers.get(stream_info.proto)
            if handler is None:
                logger.debug(repr(DispatchFailure(f"No stream handler for protocol {stream_info.proto!r}")))
                return
            self._handler_writers.discard(writer)
            reader, writer = shm_pipe.accept_shm_pipe(info_message, reader, writer)
            self._handler_writers.add(writer)
            tune_stream_transport(writer)
            await handler(stream_info, reader, writer)
        except asyncio.CancelledError:
            # this task was cancelled (by close(), or the event loop ending), or the handler raised it: Python 3.11+
            # can tell them apart
            cancelling = getattr(task, "cancelling", None)
            cancelled = cancelling is None or cancelling() > 0
        except Exception as e:
            logger.warning(f"Stream handler failed: {e!r}", exc_info=logger.isEnabledFor(logging.DEBUG))
        finally:
            # what the handler wrote last may wait for its peer as long as a frame it writes (unless we must end now)
            unsent = writer.transport.get_write_buffer_size()
            linger = None if cancelled or self._closed else framing.stall_bound(unsent)
            try:
                await streams.close_when_sent(writer, linger)
            finally:
                self._handler_writers.discard(writer)
                self._handler_tasks.discard(task)

    # ---------------------------------------------------------------- unary RPCs (persistent connection)

    async def add_unary_handler(self, proto: str, handler: UnaryHandler, balanced: bool = False) -> None:
        conn = await self.open_persistent_connection()
        await conn.add_unary_handler(proto, handler, balanced=balanced)

    async def remove_unary_handler(self, protocol: str) -> None:
        conn = await self.open_persistent_connection()
        await conn.remove_unary_handler(protocol)

    async def ping(self) -> None:
        """A round trip through the persistent connection: ``P2PDaemonError`` if p2pd is gone."""
        conn = await self.open_persistent_connection()
        await conn.ping()

    async def call_unary_handler(self, peer: PeerID, protocol: str, payload: bytes) -> bytes:
        conn = await self.open_persistent_connection()
        return await conn.call_unary_handler(peer, protocol, payload)
