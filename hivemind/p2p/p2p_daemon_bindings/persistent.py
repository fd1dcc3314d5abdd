"""The multiplexed persistent connection to p2pd that carries unary RPCs both ways."""

import asyncio
import uuid
from typing import Awaitable, Callable, Dict, Optional, Tuple

from hivemind.p2p.p2p_daemon_bindings.datastructures import PeerID
from hivemind.p2p.p2p_daemon_bindings.utils import (
    P2PDaemonError,
    P2PHandlerError,
    RequestTooLargeError,
    decode_varint,
    read_unsigned_varint,
    serialize_delimited,
)
from hivemind.proto import p2pd_pb2
from hivemind.utils.logging import get_logger

logger = get_logger(__name__)

UnaryHandler = Callable[[bytes, PeerID], Awaitable[bytes]]

# slack for the envelope (call id, peer id, protocol name) around a payload of the maximal size
ENVELOPE_SLACK = 64 * 1024


# a message above the limit is skipped in chunks; its head holds the call id, its kind and the protocol name
OVERSIZED_HEAD_BYTES = 4096
OVERSIZED_SKIP_CHUNK = 2**20
_ENVELOPE_KINDS = {2: "callUnaryResponse", 3: "requestHandling"}


def peek_envelope(head: bytes) -> Tuple[Optional[bytes], Optional[str], str]:
    """(call id, kind, protocol) from the head of an encoded ``PersistentConnectionResponse`` (None where the head
    does not hold them); p2pd writes the call id first, then the message, whose request starts with peer and proto."""
    call_id, kind, protocol = None, None, "a unary handler"
    try:
        offset = 0
        while offset < len(head):
            tag, offset = decode_varint(head, offset)
            if tag & 7 != 2:  # every field here is length-delimited
                break
            length, offset = decode_varint(head, offset)
            if tag >> 3 == 1 and offset + length <= len(head):
                call_id = bytes(head[offset : offset + length])
                offset += length
                continue
            kind = _ENVELOPE_KINDS.get(tag >> 3)
            if kind == "requestHandling":
                request = p2pd_pb2.CallUnaryRequest()
                fields = head[offset : offset + length]
                request.MergeFromString(_leading_complete_fields(fields, stop_at=3))
                protocol = request.proto or protocol
            break
    except Exception:  # a head we cannot read: the call is only logged
        pass
    return call_id, kind, protocol


def _leading_complete_fields(data: bytes, stop_at: int) -> bytes:
    """The leading length-delimited fields of ``data`` that it holds completely, up to field ``stop_at``."""
    offset = 0
    while offset < len(data):
        tag, after_tag = decode_varint(data, offset)
        if tag >> 3 >= stop_at or tag & 7 != 2:
            break
        length, after_length = decode_varint(data, after_tag)
        if after_length + length > len(data):
            break
        offset = after_length + length
    return bytes(data[:offset])


class P2PTimeoutError(P2PDaemonError, asyncio.TimeoutError):
    """A call got no answer in time (the message names the peer and the handler); the call was cancelled."""


class PersistentConnection:
    """Owns one upgraded control connection: routes replies by call id and serves incoming unary requests.

    Every public coroutine raises ``P2PDaemonError`` promptly once the connection is lost (e.g. p2pd died).
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        max_msg_size: int,
        describe_connection_loss: Optional[Callable[[], Awaitable[str]]] = None,
    ) -> None:
        self._reader, self._writer = reader, writer
        self.max_msg_size = max_msg_size
        self._describe_connection_loss = describe_connection_loss
        self._pending: Dict[bytes, asyncio.Future] = {}
        self._handlers: Dict[str, UnaryHandler] = {}
        self._handler_tasks: Dict[bytes, asyncio.Task] = {}
        self._read_task: Optional[asyncio.Task] = None
        self.failure: Optional[P2PDaemonError] = None

    def start(self) -> None:
        self._read_task = asyncio.create_task(self._read_loop())

    @property
    def is_alive(self) -> bool:
        """False once the connection failed or p2pd closed it (even before the reading task noticed)."""
        return self.failure is None and not self._reader.at_eof()

    async def close(self) -> None:
        """Close the connection; pending calls fail with ``P2PDaemonError`` and running handlers are cancelled."""
        self._fail(P2PDaemonError("The persistent connection to p2pd was closed by this client"))
        self._writer.close()
        if self._read_task is not None:
            self._read_task.cancel()
            await asyncio.gather(self._read_task, return_exceptions=True)
        tasks = list(self._handler_tasks.values())
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    # ---------------------------------------------------------------- requests from this client

    async def add_unary_handler(self, proto: str, handler: UnaryHandler, balanced: bool = False) -> None:
        request = p2pd_pb2.PersistentConnectionRequest(
            callId=uuid.uuid4().bytes, addUnaryHandler=p2pd_pb2.AddUnaryHandlerRequest(proto=proto, balanced=balanced)
        )
        await self._request(request)
        self._handlers[proto] = handler

    async def remove_unary_handler(self, protocol: str) -> None:
        request = p2pd_pb2.PersistentConnectionRequest(
            callId=uuid.uuid4().bytes, removeUnaryHandler=p2pd_pb2.RemoveUnaryHandlerRequest(proto=protocol)
        )
        await self._request(request)
        self._handlers.pop(protocol, None)

    async def ping(self) -> None:
        """One round trip through p2pd; raises ``P2PDaemonError`` only if the connection is lost meanwhile.

        Removing a handler that was never registered (a random name) is a harmless request p2pd always answers.
        """
        request = p2pd_pb2.PersistentConnectionRequest(
            callId=uuid.uuid4().bytes,
            removeUnaryHandler=p2pd_pb2.RemoveUnaryHandlerRequest(proto=f"/hivemind/ping/{uuid.uuid4().hex}"),
        )
        try:
            await self._request(request)
        except P2PDaemonError:
            if self.failure is not None:
                raise
            # the expected answer: "handler ... does not exist"

    async def call_unary_handler(self, peer: PeerID, protocol: str, payload: bytes) -> bytes:
        """Call unary handler ``protocol`` of ``peer``; returns the serialized response.

        :raises P2PHandlerError: the remote handler raised or returned an error
        :raises P2PDaemonError: the message is too large, the peer is unreachable or does not serve ``protocol``
        """
        call_id = uuid.uuid4().bytes
        request = p2pd_pb2.PersistentConnectionRequest(
            callId=call_id, callUnary=p2pd_pb2.CallUnaryRequest(peer=peer.to_bytes(), proto=protocol, data=payload)
        )
        size = request.ByteSize()
        if size > self.max_msg_size:
            raise RequestTooLargeError(
                f"Message size exceeds set limit: the request to {protocol} takes {size} bytes, "
                f"persistent_conn_max_msg_size is {self.max_msg_size} bytes; send large data through a stream handler"
            )
        response = await self._request(request, cancel_on_abort=True)
        result = response.callUnaryResponse
        if result.HasField("error"):
            raise P2PHandlerError(result.error.decode(errors="replace"))
        return result.response

    async def _request(
        self, request: p2pd_pb2.PersistentConnectionRequest, cancel_on_abort: bool = False
    ) -> p2pd_pb2.PersistentConnectionResponse:
        if self.failure is not None:
            raise self._copy_failure()
        call_id = request.callId
        future = asyncio.get_running_loop().create_future()
        self._pending[call_id] = future
        try:
            await self._send(request)
            response: p2pd_pb2.PersistentConnectionResponse = await future
        except asyncio.CancelledError:
            # (awaiting a future that gets cancelled cancels it too, so only a received reply means "too late")
            if cancel_on_abort and self.failure is None and (future.cancelled() or not future.done()):
                self._send_nowait(p2pd_pb2.PersistentConnectionRequest(callId=call_id, cancel=p2pd_pb2.Cancel()))
            raise
        finally:
            self._pending.pop(call_id, None)
            if future.done() and not future.cancelled():
                future.exception()  # failed by _fail() while this call was still sending: that error is raised here
        kind = response.WhichOneof("message")
        if kind == "daemonError":
            raise P2PDaemonError(f"p2pd error: {response.daemonError.message}")
        if kind == "cancel":
            raise P2PDaemonError("p2pd cancelled the call")
        return response

    # ---------------------------------------------------------------- I/O

    def _send_nowait(self, message: p2pd_pb2.PersistentConnectionRequest) -> None:
        self._writer.write(serialize_delimited(message))

    async def _send(self, message: p2pd_pb2.PersistentConnectionRequest) -> None:
        # one write() per message keeps the messages of concurrent senders intact
        self._send_nowait(message)
        try:
            await self._writer.drain()  # DirectReadProtocol lets any number of senders wait here at once
        except ConnectionError as e:
            self._fail(await self._lost_error(e))
            raise self._copy_failure() from e

    async def _read_loop(self) -> None:
        max_size = self.max_msg_size + ENVELOPE_SLACK
        read_payload = getattr(self._reader, "read_payload", self._reader.readexactly)  # fewer copies
        try:
            while True:
                size = await read_unsigned_varint(self._reader)
                if size > max_size:
                    # the daemon's own limit may be larger (a replica of a daemon started with a larger
                    # persistent_conn_max_msg_size): fail that one call, not the connection and every handler on it
                    await self._refuse_oversized(size)
                    continue
                data = await read_payload(size)
                message = p2pd_pb2.PersistentConnectionResponse()
                message.ParseFromString(data)
                self._dispatch(message)
        except asyncio.CancelledError:
            raise
        except (asyncio.IncompleteReadError, ConnectionError) as e:
            self._fail(await self._lost_error(e))
        except Exception as e:
            logger.error(f"Malformed message on the persistent connection to p2pd: {e!r}")
            self._fail(P2PDaemonError(f"Malformed message from p2pd on the persistent connection: {e!r}"))
            self._writer.close()

    async def _refuse_oversized(self, size: int) -> None:
        """Skip a message above ``max_msg_size`` (keeping its head) and fail the call it belongs to."""
        head = await self._reader.readexactly(min(size, OVERSIZED_HEAD_BYTES))
        left = size - len(head)
        while left > 0:
            left -= len(await self._reader.readexactly(min(left, OVERSIZED_SKIP_CHUNK)))
        call_id, kind, protocol = peek_envelope(head)
        limit = f"persistent_conn_max_msg_size = {self.max_msg_size} bytes"
        if kind == "requestHandling" and call_id is not None:
            error = P2PDaemonError(
                f"The request to {protocol} takes {size} bytes, above {limit} of the process serving it (a P2P whose "
                f"daemon accepts more, e.g. from P2P.replicate); send large data through a stream handler"
            )
            logger.warning(str(error))
            response = p2pd_pb2.CallUnaryResponse(error=repr(error).encode())
            if self.failure is None:
                self._send_nowait(p2pd_pb2.PersistentConnectionRequest(callId=call_id, unaryResponse=response))
        elif kind == "callUnaryResponse" and call_id in self._pending:
            future = self._pending[call_id]
            if not future.done():
                future.set_exception(
                    P2PDaemonError(
                        f"The response takes {size} bytes, above {limit} of this P2P (its daemon accepts more, e.g. "
                        f"it is a P2P.replicate); send large data through a stream handler"
                    )
                )
        else:
            logger.warning(f"Skipped a message of {size} bytes from p2pd above {limit}")

    def _dispatch(self, message: p2pd_pb2.PersistentConnectionResponse) -> None:
        call_id = message.callId
        kind = message.WhichOneof("message")
        if kind == "requestHandling":
            task = asyncio.create_task(self._handle_request(call_id, message.requestHandling))
            self._handler_tasks[call_id] = task
            task.add_done_callback(lambda _, call_id=call_id, task=task: self._forget_handler_task(call_id, task))
        elif kind == "cancel" and call_id in self._handler_tasks:
            self._handler_tasks[call_id].cancel()
        else:
            future = self._pending.get(call_id)
            if future is None:
                logger.debug(f"Ignoring a {kind} message from p2pd for an unknown call id {call_id.hex()}")
            elif not future.done():
                future.set_result(message)

    def _forget_handler_task(self, call_id: bytes, task: asyncio.Task) -> None:
        # the remote caller chooses call ids: a cancelled call's task may end after a new call reused its id
        if self._handler_tasks.get(call_id) is task:
            del self._handler_tasks[call_id]

    async def _handle_request(self, call_id: bytes, request: p2pd_pb2.CallUnaryRequest) -> None:
        response = p2pd_pb2.CallUnaryResponse()
        handler = self._handlers.get(request.proto)
        try:
            if handler is None:
                raise P2PDaemonError(f"No unary handler for protocol {request.proto!r} on this peer")
            response.response = await handler(request.data, PeerID(request.peer))
        except asyncio.CancelledError:
            return  # the caller went away (daemon sent cancel) or this connection is closing: nothing to answer
        except Exception as e:
            response.error = repr(e).encode()
        message = p2pd_pb2.PersistentConnectionRequest(callId=call_id, unaryResponse=response)
        if message.ByteSize() > self.max_msg_size:
            error = P2PDaemonError(
                f"Response of {request.proto} takes {message.ByteSize()} bytes, exceeding persistent_conn_max_msg_size"
                f" = {self.max_msg_size} bytes"
            )
            logger.warning(str(error))
            message = p2pd_pb2.PersistentConnectionRequest(
                callId=call_id, unaryResponse=p2pd_pb2.CallUnaryResponse(error=repr(error).encode())
            )
        if self.failure is None:
            try:
                await self._send(message)
            except P2PDaemonError:
                pass

    # ---------------------------------------------------------------- failure handling

    async def _lost_error(self, cause: BaseException) -> P2PDaemonError:
        details = ""
        if self._describe_connection_loss is not None:
            try:
                details = f" ({await self._describe_connection_loss()})"
            except Exception as e:  # pragma: no cover - diagnostics must not mask the failure
                logger.debug(f"Could not describe the loss of the p2pd connection: {e!r}")
        if isinstance(cause, asyncio.IncompleteReadError):
            cause_text = "connection closed by p2pd"
        else:
            cause_text = repr(cause)
        return P2PDaemonError(f"Lost the persistent connection to p2pd: {cause_text}{details}")

    def _copy_failure(self) -> P2PDaemonError:
        return P2PDaemonError(str(self.failure))

    def _fail(self, error: P2PDaemonError) -> None:
        """Mark the connection dead: every pending call fails with ``error``, running handlers are cancelled."""
        if self.failure is not None:
            return
        self.failure = error
        for future in self._pending.values():
            if not future.done():
                future.set_exception(P2PDaemonError(str(error)))
        for task in self._handler_tasks.values():
            task.cancel()
