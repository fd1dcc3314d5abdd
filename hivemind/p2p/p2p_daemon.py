"""``P2P``: a libp2p peer backed by a child p2pd daemon, with protobuf RPC handlers."""

import asyncio
import base64
import dataclasses
import os
import secrets
import typing
from typing import Any, AsyncIterator, Awaitable, Callable, List, Mapping, Optional, Sequence, Tuple, Union

from google.protobuf.message import Message

from hivemind.p2p import daemon_args, framing, protobuf_streams, stale_sockets
from hivemind.p2p.call_arguments import check_call, check_new_handler
from hivemind.p2p.daemon_binary import get_p2pd_path
from hivemind.p2p.daemon_process import DaemonProcess, golog_level_for, remove_socket_file_with
from hivemind.p2p.identity import generate_identity, identity_file_exists, load_identity_peer_id
from hivemind.p2p.p2p_calls import DEFAULT_MAX_MESSAGE_SIZE, DEFAULT_UNARY_CALL_TIMEOUT, ProtobufCallsMixin
from hivemind.p2p.p2p_daemon_bindings import streams
from hivemind.p2p.p2p_daemon_bindings.control import (
    DEFAULT_MAX_MSG_SIZE,
    ControlClient,
    DaemonConnector,
    unix_socket_path,
)
from hivemind.p2p.p2p_daemon_bindings.datastructures import PeerID, PeerInfo, StreamInfo
from hivemind.p2p.p2p_daemon_bindings.persistent import P2PTimeoutError
from hivemind.p2p.p2p_daemon_bindings.utils import ControlFailure, P2PDaemonError, P2PHandlerError
from hivemind.utils.logging import get_logger
from hivemind.utils.malloc_tuning import tune_malloc_if_requested
from hivemind.utils.multiaddr import Multiaddr

logger = get_logger(__name__)
# start-up lines that the command-line tools' users see and that their documentation quotes
NEW_IDENTITY_LINE = "Generating new identity to be saved in `{path}`"
CHECK_IDENTITY_LINE = "Checking that identity from `{path}` is not used by other peers"

__all__ = ["P2P", "P2PContext", "P2PDaemonError", "P2PHandlerError", "P2PTimeoutError"]

MaddrLike = Union[str, Multiaddr]
Seconds = float
Bytes = int
ProtobufType = typing.Type[Message]
HandleName = str
DeprecatedOption = Optional[bool]  # accepted for compatibility, warns, has no effect
TInputProtobuf = Any
TOutputProtobuf = Any
TInputStream = AsyncIterator[TInputProtobuf]
TOutputStream = AsyncIterator[TOutputProtobuf]


def _socket_token() -> str:
    """A random, file-name-safe token that makes the socket paths of one P2P instance unique."""
    return base64.urlsafe_b64encode(secrets.token_bytes(8)).decode().rstrip("=")


@dataclasses.dataclass(frozen=True)
class P2PContext:
    """Passed to every handler: the handle name that was called and who called it."""

    handle_name: str
    local_id: PeerID
    remote_id: PeerID = None


class P2P(ProtobufCallsMixin):
    """A libp2p peer: owns (or attaches to) a p2pd daemon and serves/calls named protobuf handlers.

    Create with ``await P2P.create(...)`` (starts a daemon) or ``await P2P.replicate(maddr)`` (attaches to the
    daemon of another ``P2P``, e.g. from a child process). Always ``await p2p.shutdown()`` when done.
    """

    HEADER_LEN = framing.HEADER_LEN
    BYTEORDER = framing.BYTEORDER
    MESSAGE_MARKER = framing.MESSAGE_MARKER
    ERROR_MARKER = framing.ERROR_MARKER
    END_OF_STREAM = protobuf_streams.END_OF_STREAM
    DHT_MODE_MAPPING = daemon_args.DHT_MODE_MAPPING
    FORCE_REACHABILITY_MAPPING = daemon_args.FORCE_REACHABILITY_MAPPING

    _UNIX_SOCKET_PREFIX = "/unix/tmp/hivemind-"

    def __init__(self) -> None:
        self.peer_id: Optional[PeerID] = None
        self._client: Optional[ControlClient] = None
        self._daemon: Optional[DaemonProcess] = None
        self._daemon_listen_maddr: Optional[Multiaddr] = None
        self._client_listen_maddr: Optional[Multiaddr] = None
        self._announced_addrs: List[Multiaddr] = []
        self._stream_writers: typing.Set[asyncio.StreamWriter] = set()
        self._daemon_failure: Optional[P2PDaemonError] = None
        self._is_shut_down = False
        self.unary_call_timeout: Optional[Seconds] = DEFAULT_UNARY_CALL_TIMEOUT

    # ------------------------------------------------------------------------------------------ start-up

    @classmethod
    async def create(
        cls,
        initial_peers: Optional[Sequence[MaddrLike]] = None,
        *,
        announce_maddrs: Optional[Sequence[MaddrLike]] = None,
        auto_nat: bool = True,
        conn_manager: bool = True,
        dht_mode: str = "server",
        force_reachability: Optional[str] = None,
        host_maddrs: Optional[Sequence[MaddrLike]] = ("/ip4/127.0.0.1/tcp/0",),
        identity_path: Optional[str] = None,
        idle_timeout: Seconds = 30,
        nat_port_map: bool = True,
        relay_hop_limit: int = 0,
        startup_timeout: Seconds = 15,
        tls: bool = True,
        use_auto_relay: bool = False,
        use_ipfs: bool = False,
        use_relay: bool = True,
        persistent_conn_max_msg_size: Bytes = DEFAULT_MAX_MSG_SIZE,
        quic: DeprecatedOption = None,
        use_relay_hop: DeprecatedOption = None,
        use_relay_discovery: DeprecatedOption = None,
        check_if_identity_free: bool = True,
        no_listen: bool = False,
        trusted_relays: Optional[Sequence[MaddrLike]] = None,
        unary_call_timeout: Optional[Seconds] = DEFAULT_UNARY_CALL_TIMEOUT,
        tune_malloc: Optional[bool] = None,
        daemon_flags: Optional[Mapping[str, Any]] = None,
    ) -> "P2P":
        """Start a p2pd daemon and connect to it.

        :param startup_timeout: seconds to wait for the daemon to report its peer id
        :param idle_timeout: the daemon exits if no persistent connection is opened within this many seconds
        :param persistent_conn_max_msg_size: max size of one unary request or response, bytes
        :param unary_call_timeout: default seconds a unary call waits for its answer (None: forever)
        :param tune_malloc: tune glibc's malloc for large messages in this whole process (see
            ``hivemind.utils.malloc_tuning``); None: only if ``HIVEMIND_TUNE_MALLOC=1``
        :param daemon_flags: further p2pd flags by name, e.g. ``{"limitStreamsPerPeer": 256}`` (the limits and relay
            settings in p2pd/README.md); an unknown flag makes the daemon fail to start with P2PDaemonError
        :raises P2PDaemonError: the daemon could not start (the message quotes p2pd's own error output)
        """
        assert not (initial_peers and use_ipfs), "Pass either initial_peers or use_ipfs=True, not both"
        daemon_args.warn_deprecated(quic=quic, use_relay_hop=use_relay_hop, use_relay_discovery=use_relay_discovery)
        daemon_args.check_announce_maddrs(announce_maddrs)
        host_maddrs, draft_quic = daemon_args.upgrade_quic_draft(host_maddrs)
        if draft_quic:
            logger.warning(
                f"QUIC draft-29 listen addresses {draft_quic} are served as QUIC v1 ('/quic-v1'): this p2pd no longer "
                f"supports draft-29 ('/quic'); pass '/quic-v1' addresses to silence this warning"
            )

        try:
            binary_path = get_p2pd_path()
        except (OSError, RuntimeError) as e:
            raise P2PDaemonError(str(e)) from e

        tune_malloc_if_requested(tune_malloc)  # process-wide: opt-in (the DHT process opts in)
        stale_sockets.sweep_stale_files()  # sockets and pipe files of killed peers (SIGKILL runs no cleanup)
        self = cls()
        self.unary_call_timeout = unary_call_timeout
        token = _socket_token()
        self._daemon_listen_maddr = cls._socket_maddr("p2pd", token)
        self._client_listen_maddr = cls._socket_maddr("p2pclient", token)
        args = daemon_args.build_daemon_args(
            control_maddr=self._daemon_listen_maddr,
            initial_peers=initial_peers,
            announce_maddrs=announce_maddrs,
            auto_nat=auto_nat,
            conn_manager=conn_manager,
            dht_mode=dht_mode,
            force_reachability=force_reachability,
            host_maddrs=host_maddrs,
            identity_path=identity_path,
            idle_timeout=idle_timeout,
            nat_port_map=nat_port_map,
            relay_hop_limit=relay_hop_limit,
            tls=tls,
            use_auto_relay=use_auto_relay,
            use_ipfs=use_ipfs,
            use_relay=use_relay,
            max_msg_size=persistent_conn_max_msg_size,
            no_listen=no_listen,
            trusted_relays=trusted_relays,
            daemon_flags=daemon_flags,
        )  # checks the options before anything below starts a probe daemon or writes an identity file
        if identity_path is not None:
            if identity_file_exists(identity_path):
                load_identity_peer_id(identity_path)  # a file that holds no key fails here, with or without peers
                if check_if_identity_free and initial_peers:
                    logger.info(CHECK_IDENTITY_LINE.format(path=identity_path))
                    same_swarm = dict(tls=tls, use_auto_relay=use_auto_relay, use_ipfs=use_ipfs, use_relay=use_relay)
                    if await cls.is_identity_taken(identity_path, initial_peers=initial_peers, **same_swarm):
                        raise P2PDaemonError(
                            f"A peer with the identity from {identity_path} is already online; "
                            "use another identity_path or stop the other peer"
                        )
            else:
                logger.info(NEW_IDENTITY_LINE.format(path=identity_path))
                generate_identity(identity_path)

        env = dict(os.environ, GOLOG_LOG_FMT="json")
        env.setdefault("GOLOG_LOG_LEVEL", golog_level_for(logger.getEffectiveLevel()))
        socket_paths = [unix_socket_path(self._daemon_listen_maddr), unix_socket_path(self._client_listen_maddr)]
        self._daemon = DaemonProcess(binary_path, args, env=env, cleanup_paths=socket_paths)
        self._daemon.on_unexpected_exit = self._on_daemon_exit
        try:
            await self._daemon.start(startup_timeout)
            await self._connect(persistent_conn_max_msg_size)
        except BaseException:
            await self.shutdown()
            raise
        return self

    @classmethod
    def _socket_maddr(cls, kind: str, token: str) -> Multiaddr:
        # the pid in the name lets a later start tell a killed owner's leftover socket (see stale_sockets)
        return Multiaddr(f"{cls._UNIX_SOCKET_PREFIX}{kind}-{os.getpid()}_{token}.sock")

    @classmethod
    async def replicate(
        cls,
        daemon_listen_maddr: MaddrLike,
        *,
        unary_call_timeout: Optional[Seconds] = DEFAULT_UNARY_CALL_TIMEOUT,
        tune_malloc: Optional[bool] = None,
        persistent_conn_max_msg_size: Bytes = DEFAULT_MAX_MSG_SIZE,
    ) -> "P2P":
        """Attach to a running daemon (e.g. started by ``P2P.create`` in a parent process); owns no process.

        The options mean the same as in ``P2P.create`` (pass the owner's ``persistent_conn_max_msg_size``).
        """
        daemon_args.check_max_msg_size(persistent_conn_max_msg_size)
        tune_malloc_if_requested(tune_malloc)
        self = cls()
        self.unary_call_timeout = unary_call_timeout
        self._daemon_listen_maddr = Multiaddr(str(daemon_listen_maddr))
        self._client_listen_maddr = cls._socket_maddr("p2pclient", _socket_token())
        # no daemon of ours removes this socket: it goes at garbage collection or exit if shutdown() is never called
        remove_socket_file_with(self, unix_socket_path(self._client_listen_maddr))
        try:
            await self._connect(persistent_conn_max_msg_size)
        except BaseException:
            await self.shutdown()
            raise
        return self

    async def _connect(self, max_msg_size: int) -> None:
        connector = DaemonConnector(self._daemon_listen_maddr, max_msg_size=max_msg_size)
        self._client = ControlClient(
            connector,
            self._client_listen_maddr,
            unary_max_msg_size=max_msg_size,
            describe_connection_loss=self._describe_daemon_state,
        )
        await self._client.listen()
        await self._client.open_persistent_connection()
        self.peer_id, self._announced_addrs = await self._client.identify()

    @classmethod
    async def is_identity_taken(
        cls,
        identity_path: str,
        *,
        initial_peers: Sequence[MaddrLike],
        use_ipfs: bool,
        use_relay: bool,
        use_auto_relay: bool,
        tls: bool,
    ) -> bool:
        """Whether a live peer reachable through ``initial_peers`` already uses this identity's peer id.

        Starts a temporary daemon with a fresh identity, connects to the bootstrap peers and tries to dial the
        identity's peer id.
        """
        peer_id = load_identity_peer_id(identity_path)
        probe = await cls.create(
            initial_peers,
            check_if_identity_free=False,
            dht_mode="client",
            use_relay=use_relay,
            use_auto_relay=use_auto_relay,
            use_ipfs=use_ipfs,
            tls=tls,
        )
        try:
            await probe._client.connect(peer_id, [], timeout=5)
            return True
        except ControlFailure:
            return False
        finally:
            await probe.shutdown()

    @staticmethod
    def generate_identity(identity_path: str) -> None:
        """Write a new 2048-bit RSA libp2p identity file (mode 0400)."""
        generate_identity(identity_path)

    # ------------------------------------------------------------------------------------------ state

    @property
    def daemon_listen_maddr(self) -> Multiaddr:
        """The daemon's control socket; pass it to ``P2P.replicate`` in another process."""
        return self._daemon_listen_maddr

    @property
    def is_alive(self) -> bool:
        if self._is_shut_down or self._daemon_failure is not None:
            return False
        if self._daemon is not None and not self._daemon.is_running:
            return False
        return self._client is not None and self._client.persistent_connection_alive

    async def get_visible_maddrs(self, latest: bool = False) -> typing.List[Multiaddr]:
        """Addresses other peers can use to reach this one, each ending with ``/p2p/<peer id>``.

        :param latest: ask the daemon again instead of using the addresses reported at start-up
        :raises ValueError: the daemon reports no addresses
        """
        if latest:
            self._announced_addrs = (await self._live_client.identify())[1]
        if len(self._announced_addrs) == 0:
            raise ValueError(
                f"p2pd of peer {self.peer_id} reports no addresses: it listens on none (no_listen?); with "
                "use_auto_relay=True it gets addresses through a relay once it holds a reservation (latest=True)"
            )
        own_suffix = Multiaddr(f"/p2p/{self.peer_id.to_base58()}")
        return [maddr.encapsulate(own_suffix) for maddr in self._announced_addrs]

    async def list_peers(self) -> List[PeerInfo]:
        """Peers the daemon is currently connected to."""
        return list(await self._live_client.list_peers())

    async def wait_for_at_least_n_peers(self, n_peers: int, attempts: int = 3, delay: float = 1) -> None:
        """Poll ``list_peers`` up to ``attempts`` times, ``delay`` seconds apart; ``RuntimeError`` if too few."""
        for attempt in range(attempts):
            peers = await self._live_client.list_peers()
            if len(peers) >= n_peers:
                return
            if attempt + 1 < attempts:
                await asyncio.sleep(delay)
        raise RuntimeError("Not enough peers")

    # ------------------------------------------------------------------------------------------ framing

    send_raw_data = staticmethod(framing.send_raw_data)
    receive_raw_data = staticmethod(framing.receive_raw_data)
    send_protobuf = staticmethod(framing.send_protobuf)
    receive_protobuf = staticmethod(framing.receive_protobuf)

    # ------------------------------------------------------------------------------------------ handlers

    async def add_protobuf_handler(
        self,
        name: HandleName,
        handler: Callable[[Any, P2PContext], Union[Awaitable[Any], AsyncIterator[Any]]],
        input_protobuf_type: ProtobufType,
        *,
        balanced: bool = False,
        stream_input: bool = False,
        stream_output: bool = False,
        max_message_size: Optional[Bytes] = DEFAULT_MAX_MESSAGE_SIZE,
    ) -> None:
        """Serve ``handler`` under ``name``: unary handlers through the daemon, others as stream handlers.

        A stream handler is cancelled (it sees ``CancelledError``) when its caller closes the stream.

        :param handler: ``handler(request_or_async_iterator, P2PContext)`` returning a message (awaitable) or,
            with ``stream_output``, an async iterator of messages
        :param balanced: let other processes register the same name; the daemon distributes calls round-robin
        :param max_message_size: stream handlers only: a request announcing more bytes is refused before any memory
            is taken for it (the handler sees ``MessageTooLargeError``, the caller a ``P2PHandlerError``); None
            leaves only the 2 GiB protobuf limit. Unary requests are bounded by ``persistent_conn_max_msg_size``.
        :raises P2PDaemonError: the name is already served by this daemon (and not both ``balanced``)
        """
        check_new_handler(name, handler, input_protobuf_type)
        is_unary = not (stream_input or stream_output)
        if is_unary:
            await self._add_unary_handler(name, handler, input_protobuf_type, balanced=balanced)
            return

        async def _serve_stream(stream_info: StreamInfo, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
            context = P2PContext(handle_name=name, local_id=self.peer_id, remote_id=stream_info.peer_id)
            await protobuf_streams.serve_protobuf_stream(
                handler,
                context,
                input_protobuf_type,
                reader,
                writer,
                stream_input=stream_input,
                stream_output=stream_output,
                max_message_size=max_message_size,
                admit=self.inbound_budget.for_peer(stream_info.peer_id, max_message_size),
            )

        await self._live_client.stream_handler(name, _serve_stream, balanced=balanced)

    async def _add_unary_handler(
        self, name: str, handler: Callable, input_protobuf_type: ProtobufType, *, balanced: bool
    ) -> None:
        async def _serve_unary(data: bytes, remote_id: PeerID) -> bytes:
            request = input_protobuf_type()
            request.ParseFromString(data)
            context = P2PContext(handle_name=name, local_id=self.peer_id, remote_id=remote_id)
            response = await handler(request, context)
            return response.SerializeToString()

        await self._live_client.add_unary_handler(name, _serve_unary, balanced=balanced)

    async def remove_protobuf_handler(
        self, name: str, *, stream_input: bool = False, stream_output: bool = False
    ) -> None:
        """Stop serving ``name`` (pass the same ``stream_*`` flags as when it was added)."""
        if stream_input or stream_output:
            await self._live_client.remove_stream_handler(name)
        else:
            await self._live_client.remove_unary_handler(name)

    async def add_binary_stream_handler(
        self,
        name: str,
        handler: Callable[[StreamInfo, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
        balanced: bool = False,
    ) -> None:
        """Serve raw libp2p streams of protocol ``name`` with ``handler(stream_info, reader, writer)``."""
        check_new_handler(name, handler)
        await self._live_client.stream_handler(name, handler, balanced=balanced)

    async def remove_binary_stream_handler(self, name: HandleName) -> None:
        await self._live_client.remove_stream_handler(name)

    async def call_binary_stream_handler(
        self, peer_id: PeerID, handler_name: str
    ) -> Tuple[StreamInfo, asyncio.StreamReader, asyncio.StreamWriter]:
        """Open a raw stream to ``handler_name`` of ``peer_id``; the caller must close the writer."""
        check_call(peer_id, handler_name)
        return await self._live_client.stream_open(peer_id, [handler_name])

    # ------------------------------------------------------------------------------------------ failures

    def _on_daemon_exit(self, error: P2PDaemonError) -> None:
        """p2pd exited on its own: fail everything in flight instead of letting it hang."""
        self._daemon_failure = error
        for writer in list(self._stream_writers):
            writer.transport.abort()

    def _raise_if_daemon_failed(self) -> None:
        if self._is_shut_down:
            raise P2PDaemonError("This P2P instance was shut down")
        if self._daemon_failure is not None:
            raise P2PDaemonError(str(self._daemon_failure))
        failure = None if self._client is None else self._client.persistent_connection_failure
        if failure is not None:
            raise P2PDaemonError(str(failure))

    async def _check_stream_end(self, writer: asyncio.StreamWriter) -> None:
        """After a stream reached EOF: raise if that was because p2pd died, not because the stream ended.

        When a stream ends, p2pd only half-closes the client's socket, and keeps it open until the client closes
        it. A socket closed completely (a dead p2pd, or a stream that p2pd reset) takes the round trip below.
        """
        self._raise_if_daemon_failed()
        if streams.peer_closed_completely(writer):
            await self._raise_daemon_failure_if_any()

    async def _raise_daemon_failure_if_any(self) -> None:
        """After a stream ended with EOF, tell a normal end from a dead p2pd (its sockets all reach EOF too).

        The sockets of a dying p2pd close within a fraction of a millisecond of each other, so instead of guessing
        from timing this makes one round trip through the persistent connection, which a dead p2pd cannot answer.
        """
        self._raise_if_daemon_failed()
        try:
            if self._daemon is not None and not self._daemon.is_running:
                raise P2PDaemonError("p2pd is not running")
            await self._client.ping()
        except P2PDaemonError:
            raise P2PDaemonError(f"Stream interrupted: {await self._describe_daemon_state()}") from None

    async def _describe_daemon_state(self) -> str:
        if self._daemon is None:
            return "p2pd is owned by another process"
        await self._daemon.wait_exited(timeout=0.5)
        return self._daemon.exit_description()

    # ------------------------------------------------------------------------------------------ shutdown

    async def shutdown(self) -> None:
        """Close connections, cancel handlers, stop the daemon (if this instance started it), remove sockets."""
        if self._is_shut_down:
            return
        self._is_shut_down = True
        if self._daemon is not None:
            self._daemon.expect_exit()  # p2pd exits by itself once its last persistent connection closes
        for writer in list(self._stream_writers):
            writer.transport.abort()
        if self._client is not None:
            await self._client.close(unregister_stream_handlers=self._daemon is None)  # the daemon stays: tidy it
        if self._daemon is not None:
            await self._daemon.stop()

    def __repr__(self) -> str:
        return f"<P2P peer_id={self.peer_id} daemon={self._daemon_listen_maddr} alive={self.is_alive}>"
