"""Calling protobuf handlers of other peers: unary calls (bounded by a timeout) and stream calls."""

import asyncio
import typing
from typing import Any, AsyncIterable, AsyncIterator, Optional, Set, TypeVar, Union

from google.protobuf.message import Message

from hivemind.p2p import framing, protobuf_streams
from hivemind.p2p.call_arguments import check_call
from hivemind.p2p.inbound_budget import InboundBudget
from hivemind.p2p.p2p_daemon_bindings.control import DEFAULT_MAX_MSG_SIZE, ControlClient
from hivemind.p2p.p2p_daemon_bindings.datastructures import PeerID
from hivemind.p2p.p2p_daemon_bindings.persistent import P2PTimeoutError
from hivemind.p2p.p2p_daemon_bindings.utils import P2PHandlerError
from hivemind.utils.asyncio import await_with_timeout

Seconds = float
Bytes = int
ProtobufType = typing.Type[Message]
TInputProtobuf = Any
TOutputStream = AsyncIterator[Any]

# how long a unary call waits for its answer unless told otherwise (P2P.create/replicate, or per call)
DEFAULT_UNARY_CALL_TIMEOUT: Seconds = 300.0
DEFAULT_MAX_MESSAGE_SIZE: Bytes = framing.DEFAULT_MAX_MESSAGE_SIZE

_NO_RESPONSE = object()


class ProtobufCallsMixin:
    """The calling half of ``P2P``, which provides these attributes, ``_raise_if_daemon_failed()`` and
    ``_check_stream_end(writer)``."""

    _client: Optional[ControlClient]
    _stream_writers: Set[asyncio.StreamWriter]
    unary_call_timeout: Optional[Seconds]
    _inbound_budget: Optional[InboundBudget] = None

    # for annotating handlers and calls: P2P.TInputStream is an async iterator of P2P.TInputProtobuf messages
    TInputProtobuf, TOutputProtobuf = TypeVar("TInputProtobuf"), TypeVar("TOutputProtobuf")
    TInputStream, TOutputStream = AsyncIterator[TInputProtobuf], AsyncIterator[TOutputProtobuf]

    @property
    def persistent_conn_max_msg_size(self) -> Bytes:
        """The largest unary request or response this instance sends or takes, bytes (``P2P.create``/``replicate``)."""
        return DEFAULT_MAX_MSG_SIZE if self._client is None else self._client.unary_max_msg_size

    @property
    def _live_client(self) -> ControlClient:
        """The client, after ``_raise_if_daemon_failed()``: a call after shutdown or p2pd's death says which."""
        self._raise_if_daemon_failed()
        return self._client

    @property
    def inbound_budget(self) -> InboundBudget:
        """Bounds the bytes of request frames that this instance's stream handlers receive at once, per calling
        peer, and in all if a total is set (see ``hivemind.p2p.inbound_budget``); assign a new ``InboundBudget`` to
        change the limits."""
        if self._inbound_budget is None:
            self._inbound_budget = InboundBudget()
        return self._inbound_budget

    @inbound_budget.setter
    def inbound_budget(self, budget: InboundBudget) -> None:
        self._inbound_budget = budget

    async def call_protobuf_handler(
        self,
        peer_id: PeerID,
        name: str,
        input: Union[TInputProtobuf, AsyncIterable[TInputProtobuf]],
        output_protobuf_type: ProtobufType,
        *,
        timeout: Optional[Seconds] = None,
        max_message_size: Optional[Bytes] = DEFAULT_MAX_MESSAGE_SIZE,
    ) -> Any:
        """Call ``name`` at ``peer_id`` and return its single response.

        A message ``input`` makes a unary call (through the daemon); an async iterator makes a stream call.

        :param timeout: seconds to wait for the response; None: ``self.unary_call_timeout`` for a unary call, no
            limit for a stream call
        :param max_message_size: stream calls: a response announcing more bytes fails the call
        :raises P2PTimeoutError: no response in time (an ``asyncio.TimeoutError``); the call is cancelled
        :raises P2PHandlerError: the remote handler failed (the message carries its text)
        :raises P2PDaemonError: the peer is unreachable, does not serve ``name``, or the request is too large
        """
        check_call(peer_id, name, input, output_protobuf_type)
        is_unary = isinstance(input, Message)
        if timeout is None and is_unary:
            timeout = self.unary_call_timeout
        if is_unary:
            self._raise_if_daemon_failed()
            call = self._client.call_unary_handler(peer_id, name, input.SerializeToString())
        else:
            call = self._call_stream_once(peer_id, name, input, output_protobuf_type, max_message_size)
        try:
            result = await await_with_timeout(call, timeout)  # (wait_for may lose a cancellation)
        except asyncio.TimeoutError:
            if timeout is None:
                raise  # not this timeout: something inside the call
            kind = "unary" if is_unary else "stream"
            raise P2PTimeoutError(
                f"{kind.capitalize()} call to `{name}` at {peer_id} got no response within {timeout} s and was "
                f"cancelled (pass timeout= to wait longer, or set unary_call_timeout for all unary calls)"
            ) from None
        if is_unary:
            response = output_protobuf_type()
            response.ParseFromString(result)
            return response
        return result

    async def _call_stream_once(
        self, peer_id: PeerID, name: str, input: Any, output_protobuf_type: ProtobufType, max_message_size: Any
    ) -> Any:
        responses = self._iterate_protobuf_stream(peer_id, name, input, output_protobuf_type, max_message_size)
        try:
            result = _NO_RESPONSE
            async for response in responses:
                if result is not _NO_RESPONSE:
                    raise P2PHandlerError(f"Handler `{name}` at {peer_id} returned more than one response")
                result = response
        finally:
            await responses.aclose()
        if result is _NO_RESPONSE:
            raise P2PHandlerError(f"Handler `{name}` at {peer_id} closed the stream without a response")
        return result

    async def iterate_protobuf_handler(
        self,
        peer_id: PeerID,
        name: str,
        input: Union[TInputProtobuf, AsyncIterable[TInputProtobuf]],
        output_protobuf_type: ProtobufType,
        *,
        max_message_size: Optional[Bytes] = DEFAULT_MAX_MESSAGE_SIZE,
    ) -> TOutputStream:
        """Call stream handler ``name`` at ``peer_id``: ``async for msg in await p2p.iterate_protobuf_handler(...)``.

        ``input`` is a message or an async iterator of messages. The stream opens when iteration starts, so an
        unreachable peer or a missing handler raises ``P2PDaemonError`` from the first ``__anext__``. Closing the
        iterator early (``aclose()``, or cancelling its consumer) closes the stream, which cancels the handler.
        A response announcing more than ``max_message_size`` bytes fails the call (``P2PDaemonError``).
        """
        check_call(peer_id, name, input, output_protobuf_type)
        self._raise_if_daemon_failed()
        return self._iterate_protobuf_stream(peer_id, name, input, output_protobuf_type, max_message_size)

    async def _iterate_protobuf_stream(
        self, peer_id: PeerID, name: str, input: Any, output_protobuf_type: ProtobufType, max_message_size: Any
    ) -> TOutputStream:
        self._raise_if_daemon_failed()
        _, reader, writer = await self._client.stream_open(peer_id, [name])
        self._stream_writers.add(writer)
        responses = protobuf_streams.call_protobuf_stream(
            reader,
            writer,
            input,
            output_protobuf_type,
            description=f"`{name}` at {peer_id}",
            check_after_eof=lambda: self._check_stream_end(writer),
            max_message_size=max_message_size,
        )
        try:
            async for response in responses:
                yield response
        finally:
            writer.close()  # first: the handler learns at once that nobody waits for it any more
            if writer.transport.get_write_buffer_size():
                writer.transport.abort()  # input the handler did not take: close() would wait for it forever
            self._stream_writers.discard(writer)
            await responses.aclose()
