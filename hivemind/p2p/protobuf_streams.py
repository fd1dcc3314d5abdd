"""Protobuf RPCs over hivemind-framed streams: serving a handler and calling one.

Both sides work on any asyncio reader/writer pair; ``P2P`` only opens the streams and watches the daemon.
"""

import asyncio
import contextlib
from typing import (
    Any,
    AsyncContextManager,
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    NamedTuple,
    Optional,
    Set,
    Type,
    Union,
)

from google.protobuf.message import Message

from hivemind.p2p import framing
from hivemind.p2p.p2p_daemon_bindings.utils import P2PDaemonError, P2PHandlerError
from hivemind.proto.p2pd_pb2 import RPCError
from hivemind.utils.asyncio import await_with_timeout
from hivemind.utils.logging import get_logger

logger = get_logger(__name__)

# how many incoming requests a stream handler buffers ahead of the handler (5, like the original)
HANDLER_INPUT_PREFETCH = 5
# after refusing a request mid-stream, how long the handler side waits for the caller to close before it does
REFUSAL_LINGER = 5.0
END_OF_STREAM = RPCError()  # sent after the last request: an error frame with an empty message
_EXHAUSTED = object()


async def serve_protobuf_stream(
    handler: Callable,
    context: Any,
    input_protobuf_type: Type[Message],
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    *,
    stream_input: bool,
    stream_output: bool,
    max_message_size: Optional[int] = framing.DEFAULT_MAX_MESSAGE_SIZE,
    admit: Optional[Callable[[int], AsyncContextManager]] = None,
) -> None:
    """Handler side: feed requests to ``handler(request_or_iterator, context)`` and frame its response(s).

    A handler exception becomes one error frame with ``str(exception)``; the caller of this closes the stream.
    The handler is cancelled (it sees ``CancelledError``) when the caller closes the stream after its input.

    :param max_message_size: requests announcing more bytes are refused (the handler gets the error)
    :param admit: wraps the receiving of each request frame (the caller's share of an ``InboundBudget``); a frame it
        refuses is refused like an oversized one. One that can hold frames (``InboundBudget.for_peer``) keeps each
        request's share while it waits for the handler (see ``_RequestQueue``)
    """
    requests = _RequestQueue(admit)
    responding = asyncio.create_task(
        _respond(handler, context, requests, writer, stream_input=stream_input, stream_output=stream_output)
    )
    caller_left = asyncio.Event()

    def on_caller_left() -> None:
        caller_left.set()
        responding.cancel()

    input_ended = asyncio.Event()  # set once the caller's end-of-stream (or EOF) was read
    read_task = asyncio.create_task(
        _read_requests(
            input_protobuf_type,
            reader,
            requests,
            max_message_size,
            on_caller_left,
            input_ended,
            # a caller sends its only request (and the end of its input) at once: one that sends nothing is dropped
            idle_timeout=None if stream_input else framing.FRAME_STALL_TIMEOUT,
        )
    )
    try:
        await responding  # (cancelling this coroutine cancels the handler too)
    except asyncio.CancelledError:
        if caller_left.is_set() and not _is_being_cancelled():
            logger.debug(f"Cancelled handler {context.handle_name}: {context.remote_id} closed the stream")
            return
        # this peer is shutting down or removed the handler: tell the caller instead of a silent EOF
        writer.write(framing.encode_frame(RPCError(message=f"handler {context.handle_name} was cancelled")))
        raise
    finally:
        for task in (responding, read_task):
            task.cancel()
        try:
            _, input_refused = await asyncio.gather(responding, read_task, return_exceptions=True)
        finally:
            requests.drop()  # the requests that the handler did not take give their shares back
    if input_refused is True or not input_ended.is_set():
        # the handler is done but the caller may still be sending: closing now would reset the stream
        await _let_the_refusal_arrive(reader, writer)


async def _let_the_refusal_arrive(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Half-close, then discard what the caller still sends until it closes (at most REFUSAL_LINGER seconds).

    Closing a socket with unread bytes in it resets the stream, and a reset can overtake the last frames written:
    the error frame that explains a refusal, or the last replies of a handler that returned before reading all of
    its input. The caller closes its side as soon as it reads the end of the replies.
    """
    try:
        if writer.can_write_eof():
            writer.write_eof()

        async def discard_until_eof() -> None:
            while await reader.read(2**16):
                pass

        await await_with_timeout(discard_until_eof(), REFUSAL_LINGER)
    except asyncio.CancelledError:
        raise
    except Exception as e:  # a timeout or a broken stream: close it now either way
        logger.debug(f"Stream closed without the caller's EOF after a refused request: {e!r}")


def _is_being_cancelled() -> bool:
    """Whether the current task itself was cancelled (Python 3.11+ can tell; earlier versions assume it was)."""
    cancelling = getattr(asyncio.current_task(), "cancelling", None)
    return True if cancelling is None else cancelling() > 0


class _CallerStalled(Exception):
    """The caller took none of a response for too long (see ``framing.send_protobuf_in_time``): the stream is gone."""


async def _send_response(message: Any, writer: asyncio.StreamWriter) -> None:
    try:
        await framing.send_protobuf_in_time(message, writer)
    except framing.WriteStalledError as e:
        writer.transport.abort()  # the frame may be half written: nothing more can go through this stream
        raise _CallerStalled(str(e)) from None


class _Parked(NamedTuple):
    request: Any
    lease: Any  # an InboundBudget FrameLease


class _RequestQueue:
    """The requests of one stream that wait for its handler (at most HANDLER_INPUT_PREFETCH, then the reader waits).

    With an ``admit`` that can hold frames (``InboundBudget.for_peer``), a complete request keeps its frame's share of
    the peer's budget until the handler takes it (or the stream ends: ``drop``), so that the budget bounds requests
    parked ahead of handlers as well as frames in flight. A frame that does not fit its peer's share while this stream
    has requests parked waits for the handler to take them (a slow handler slows an honest stream down instead of
    refusing it); it is refused only if it still does not fit once this stream holds nothing.
    """

    def __init__(self, admit: Optional[Callable[[int], AsyncContextManager]]):
        self._queue: asyncio.Queue = asyncio.Queue(maxsize=HANDLER_INPUT_PREFETCH)
        self._admission = admit
        self.admit = None if admit is None else (self._hold if hasattr(admit, "hold") else admit)
        self._leases: Set[Any] = set()  # counted leases of this stream: its frame in flight and parked requests
        self._taken = asyncio.Event()
        self._arrived: Any = None  # the lease of the last frame received, until ``put`` or ``release_arrived``

    @contextlib.asynccontextmanager
    async def _hold(self, nbytes: int) -> AsyncIterator[None]:
        while self._leases and not self._admission.fits(nbytes):
            self._taken.clear()
            await self._taken.wait()
        lease = await self._admission.hold(nbytes)
        if lease.nbytes:
            self._leases.add(lease)
        try:
            yield
        except BaseException:
            self._release(lease)
            raise
        self._arrived = lease

    async def put(self, item: Any) -> None:
        """Queue a request (with the lease of the frame just received), an exception, or ``_EXHAUSTED``."""
        lease, self._arrived = self._arrived, None
        if lease is not None:
            lease.park()  # complete: it no longer counts against the frames that may wait for room (InboundBudget)
        try:
            await self._queue.put(item if lease is None else _Parked(item, lease))
        except BaseException:
            self._release(lease)
            raise

    def release_arrived(self) -> None:
        """Give back the share of a frame received but not queued (an end-of-stream or unparsable frame)."""
        lease, self._arrived = self._arrived, None
        self._release(lease)

    async def get(self) -> Any:
        """The next item for the handler; a request gives its share back as it is taken."""
        item = await self._queue.get()
        if isinstance(item, _Parked):
            self._release(item.lease)
            return item.request
        return item

    def drop(self) -> None:
        """The stream ended: give back the shares of everything received that the handler did not take."""
        self.release_arrived()
        for lease in list(self._leases):
            self._release(lease)

    def _release(self, lease: Any) -> None:
        if lease is not None:
            lease.release()
            self._leases.discard(lease)
            self._taken.set()


async def _respond(
    handler: Callable,
    context: Any,
    requests: _RequestQueue,
    writer: asyncio.StreamWriter,
    *,
    stream_input: bool,
    stream_output: bool,
) -> None:
    try:
        if stream_input:
            request = _iterate_queue(requests)
        else:
            request = await _single_request(requests)
        if stream_output:
            responses = handler(request, context)
            try:
                async for response in responses:
                    await _send_response(response, writer)
            finally:
                if hasattr(responses, "aclose"):
                    await responses.aclose()
        else:
            await _send_response(await handler(request, context), writer)
    except asyncio.CancelledError:
        raise
    except _CallerStalled as e:
        logger.debug(f"Handler {context.handle_name} stopped: {context.remote_id} does not read its responses ({e})")
    except Exception as e:
        logger.debug(f"Handler {context.handle_name} failed for {context.remote_id}: {e!r}")
        try:
            await _send_response(RPCError(message=str(e)), writer)
        except (_CallerStalled, ConnectionError, RuntimeError):
            pass


async def call_protobuf_stream(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    input: Union[Message, AsyncIterable[Message]],
    output_protobuf_type: Type[Message],
    *,
    description: str,
    check_after_eof: Callable[[], Awaitable[None]],
    max_message_size: Optional[int] = framing.DEFAULT_MAX_MESSAGE_SIZE,
) -> AsyncIterator[Any]:
    """Caller side: send ``input`` and then end-of-stream, while yielding responses until the handler closes.

    :param description: names the call in errors, e.g. "`Servicer.rpc_x` at <peer id>"
    :param check_after_eof: awaited when the stream ends or breaks; raises if the local daemon died meanwhile
    :param max_message_size: a response announcing more bytes fails the call (``P2PDaemonError``)
    :raises P2PHandlerError: the handler sent an error frame
    """
    writing_task = asyncio.create_task(_write_requests(input, writer))
    writing_task.add_done_callback(lambda task: _abort_if_input_failed(task, writer))
    try:
        while True:
            try:
                response, error = await framing.receive_protobuf(output_protobuf_type, reader, max_message_size)
            except asyncio.IncompleteReadError:
                break  # the handler closed the stream: no more responses
            except (ConnectionError, P2PDaemonError) as e:
                await check_after_eof()
                _raise_if_input_failed(writing_task)
                raise P2PDaemonError(f"Stream to {description} failed: {e}") from e
            if error is not None:
                raise P2PHandlerError(f"Failed to call handler {description}: {error.message}")
            yield response
        await check_after_eof()
        _raise_if_input_failed(writing_task)
    finally:
        writing_task.cancel()
        await asyncio.gather(writing_task, return_exceptions=True)


async def _read_requests(
    input_protobuf_type: Type[Message],
    reader: asyncio.StreamReader,
    queue: _RequestQueue,
    max_message_size: Optional[int],
    on_caller_left: Callable[[], None],
    input_ended: asyncio.Event,
    idle_timeout: Optional[float] = None,
) -> Optional[bool]:
    """Feed incoming request frames into ``queue``; ends it with ``_EXHAUSTED`` (or an exception) on EOS/EOF.
    Returns True if a request was refused (too large, malformed), leaving the rest of the input unread.

    A caller sends nothing after its end-of-stream frame, so anything read after it (in practice EOF, or a reset
    connection) means that the caller closed the stream: ``on_caller_left`` is called then.
    """
    try:
        while True:
            try:
                request, error = await framing.receive_protobuf(
                    input_protobuf_type, reader, max_message_size, idle_timeout=idle_timeout, admit=queue.admit
                )
            except asyncio.IncompleteReadError:
                input_ended.set()
                await queue.put(_EXHAUSTED)
                return  # the input ended with EOF instead of end-of-stream: nothing more to watch
            except BaseException:
                queue.release_arrived()  # a frame that arrived but did not parse
                raise
            if error is not None:
                queue.release_arrived()
                input_ended.set()
                break  # end-of-stream marker (whatever its text)
            await queue.put(request)
    except asyncio.CancelledError:
        raise
    except Exception as e:
        await queue.put(e)
        return True  # the input was refused part-way: unread bytes may follow
    await queue.put(_EXHAUSTED)
    try:
        await reader.read(1)
    except asyncio.CancelledError:
        raise
    except Exception as e:
        logger.debug(f"Stream broke after the caller's end-of-stream: {e!r}")
    on_caller_left()


async def _iterate_queue(queue: _RequestQueue) -> AsyncIterator[Any]:
    while True:
        item = await queue.get()
        if item is _EXHAUSTED:
            return
        if isinstance(item, Exception):
            raise item
        yield item


async def _single_request(queue: _RequestQueue) -> Any:
    first = await queue.get()
    if first is _EXHAUSTED:
        raise ValueError("Expected exactly one request, but the stream ended before any")
    if isinstance(first, Exception):
        raise first
    second = await queue.get()
    if isinstance(second, Exception):
        raise second
    if second is not _EXHAUSTED:
        raise ValueError("Expected exactly one request, got more")
    return first


async def _write_requests(input: Union[Message, AsyncIterable[Message]], writer: asyncio.StreamWriter) -> None:
    if isinstance(input, Message):
        await framing.send_protobuf(input, writer)
    else:
        async for request in input:
            await framing.send_protobuf(request, writer)
    await framing.send_protobuf(END_OF_STREAM, writer)


def _input_error(task: asyncio.Task) -> Optional[BaseException]:
    """The exception of a finished request-writing task, unless it only failed because the stream closed."""
    if not task.done() or task.cancelled():
        return None
    error = task.exception()
    return None if isinstance(error, ConnectionError) else error


def _abort_if_input_failed(task: asyncio.Task, writer: asyncio.StreamWriter) -> None:
    # the caller's input iterator raised: stop the call (the reader then sees EOF and re-raises that error)
    if _input_error(task) is not None:
        writer.transport.abort()


def _raise_if_input_failed(task: asyncio.Task) -> None:
    error = _input_error(task)
    if error is not None:
        raise error
