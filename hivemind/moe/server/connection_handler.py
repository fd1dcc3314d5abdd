"""ConnectionHandler: serves the experts of a server over p2p (rpc_info, rpc_forward, rpc_backward and streams).

Where it runs. A ConnectionHandler is a ``multiprocessing.Process`` (as in the original, and as petals subclasses
it): ``start()`` / ``run_in_background()`` serve from a child process with its own event loop and its own P2P
client of the DHT's daemon, under fork and spawn alike (under spawn, the DHT and the module backends travel to the
child by pickling). ``run_in_thread()`` serves from a thread of the calling process instead. ``Server`` uses the
thread by default: requests then reach the task pools without crossing a process boundary (no pickling of tensors
into shared memory, no extra copies), which is most of the difference in throughput, and start-up costs no process.

Every request is checked against the expert's schema before it becomes a task (see expert_requests.py): an
unknown uid, a wrong number, shape or dtype of tensors, an empty batch, a batch over max_batch_size or a tensor
that does not decode is answered with an error naming the problem, and never joins a batch. A request (or stream
message) that carries more tensors than its expert takes is refused before protobuf parses it. A streamed request that
ends before all of its tensors, or all the chunks they announced, arrived (its caller died mid-stream) is dropped with
a logged reason. The bytes of the requests a handler holds at once, and of their answers until sent, are limited
in all and per caller (see ``max_request_bytes_in_flight``). A caller that goes away while its task waits has the
task cancelled, so that pools do not compute for nobody.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import multiprocessing as mp
import signal
import threading
import time
from functools import partial
from typing import AsyncIterator, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from hivemind.dht import DHT
from hivemind.moe.server.dht_declarations import daemon_listen_maddr as _daemon_listen_maddr
from hivemind.moe.server.expert_requests import (
    STREAM_CHUNK_SIZE_BYTES,
    ExpertRequestError,
    ExpertSchema,
    IncompleteStreamError,
    RequestBytesInFlight,
    StreamedRequest,
    check_batch,
    decode_tensors,
    refusals_named,
    request_bytes,
    serialize_outputs,
    split_into_responses,
    unknown_uid_error,
)
from hivemind.moe.server.request_scan import CheckedExpertRequest
from hivemind.p2p import P2P, P2PContext, ServicerBase
from hivemind.p2p.framing import DEFAULT_MAX_MESSAGE_SIZE, FRAME_STALL_TIMEOUT, MIN_FRAME_RATE
from hivemind.p2p.servicer import get_handle_name
from hivemind.proto import runtime_pb2
from hivemind.utils.asyncio import aiter_with_timeout, await_with_timeout, switch_to_uvloop
from hivemind.utils.graceful_sigterm import GracefulSigterm
from hivemind.utils.logging import get_logger
from hivemind.utils.malloc_tuning import tune_malloc_for_large_messages
from hivemind.utils.mpfuture import MPFuture
from hivemind.utils.process_handle import exit_once_cleaned_up, peek_exitcode, stop_when_parent_exits
from hivemind.utils.serializer import MSGPackSerializer
from hivemind.utils.throttled_log import ThrottledLog

__all__ = ["ConnectionHandler", "ExpertRequestError"]

logger = get_logger(__name__)

_SHUTDOWN_COMMAND = "_shutdown"
_CLEANUP_TIMEOUT = 5.0  # seconds for unregistering handlers and closing the P2P client at shutdown
_READY_POLL_INTERVAL = 0.1  # seconds between checks that a starting handler is still alive
_LAST_WORD_TIMEOUT = 2.0  # seconds for the start-up error of a handler that has exited to arrive (loaded machines)
# one message of a streamed request: a chunk of STREAM_CHUNK_SIZE_BYTES (what clients send) and its metadata
MAX_STREAM_MESSAGE_BYTES = STREAM_CHUNK_SIZE_BYTES + 64 * 1024
# a streamed request whose next message does not arrive within this many seconds of the previous one is dropped (a
# stalled caller): what the p2p framing allows one full-size message at its slowest accepted rate (~2 minutes)
STREAM_STALL_TIMEOUT = FRAME_STALL_TIMEOUT + MAX_STREAM_MESSAGE_BYTES / MIN_FRAME_RATE
# bytes of requests one handler holds at once, in all and per caller, unless the largest valid request needs more
DEFAULT_BYTES_IN_FLIGHT = 2 * 1024**3
DEFAULT_BYTES_IN_FLIGHT_PER_PEER = 256 * 1024**2
DROPPED_STREAM_LOG_INTERVAL = 10.0  # seconds between INFO lines about incomplete streams (the others go to DEBUG)


class ConnectionHandler(mp.Process, ServicerBase):
    """
    Serves ``ConnectionHandler.rpc_*`` for the given experts through the p2p daemon of ``dht``.

    :param dht: a running DHT; the handler opens its own P2P client of the DHT's daemon
    :param module_backends: {expert uid: ModuleBackend}; requests are submitted to their forward / backward pools
    :param balanced: register the handlers as balanced, so that several handlers (processes or threads) share calls
    :param shutdown_timeout: seconds to wait for a graceful stop before a handler process is terminated
    :param start: start serving (in a child process) in the constructor and wait until ready
    """

    stream_stall_timeout: float = STREAM_STALL_TIMEOUT  # seconds a streamed request may wait for its next message
    # bytes of expert requests and answers (from receipt until the answer is sent) this handler holds at once, in all
    # and per caller; a request that would go over is refused at once. None: DEFAULT_BYTES_IN_FLIGHT, or four times the
    # largest valid call (request and answer) of hosted experts if more; per caller DEFAULT_BYTES_IN_FLIGHT_PER_PEER
    # or twice the largest, or one full call to every hosted expert (a trainer's step, up to half the total) if more
    max_request_bytes_in_flight: Optional[int] = None
    max_request_bytes_in_flight_per_peer: Optional[int] = None

    def __init__(
        self,
        dht: DHT,
        module_backends: Dict[str, object],
        *,
        balanced: bool = True,
        shutdown_timeout: float = 3,
        start: bool = False,
    ):
        super().__init__(daemon=True)
        self.dht = dht
        self.module_backends = module_backends
        self.balanced = balanced
        self.shutdown_timeout = shutdown_timeout
        receiving_end, sending_end = mp.Pipe(duplex=False)  # shutdown() sends a command (petals does too)
        self._inner_pipe, self._outer_pipe = receiving_end, sending_end
        self.ready = MPFuture()  # set once the handlers are registered (or to the start-up error)
        self._p2p: Optional[P2P] = None
        self._thread: Optional[threading.Thread] = None
        self._schemas: Optional[Dict[str, ExpertSchema]] = None
        self._infos: Dict[str, bytes] = {}
        self._bytes_in_flight: Optional[RequestBytesInFlight] = None  # created where the handler serves
        self._dropped_stream_log = ThrottledLog(logger, logging.INFO, DROPPED_STREAM_LOG_INTERVAL)
        if start:
            self.run_in_background(await_ready=True)

    # ------------------------------------------------------------------ lifecycle

    def run(self) -> None:
        """Child process entry point: serve until shutdown() or until the parent goes away."""
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the server decides
        torch.set_num_threads(1)  # this process only moves bytes; the runtime owns the CPU cores
        tune_malloc_for_large_messages()
        loop = switch_to_uvloop()
        try:
            loop.run_until_complete(self._serve())
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
        # end at once, as the DHT process does: a spawned handler would otherwise finalize its whole interpreter (torch
        # included), over a second on a busy machine, and be terminated by shutdown() with a warning
        if mp.current_process() is self:
            exit_once_cleaned_up(mp.get_start_method())

    def run_in_background(self, await_ready: bool = True, timeout: Optional[float] = None) -> None:
        """Serve from a child process; with ``await_ready``, wait until the handlers are registered."""
        self.start()
        if await_ready:
            self._await_ready(timeout)

    def wait_until_ready(self, timeout: Optional[float] = None) -> None:
        """Wait until a handler started with ``run_in_background(await_ready=False)`` serves (or raise its error)."""
        self._await_ready(timeout)

    def _await_ready(self, timeout: Optional[float]) -> None:
        """Wait until the handler serves; a handler that died first (killed, crashed) is an error, not a hang."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            wait = _READY_POLL_INTERVAL if deadline is None else min(_READY_POLL_INTERVAL, deadline - time.monotonic())
            try:
                return self.ready.result(timeout=max(0.0, wait))
            except TimeoutError:
                if self._has_ended():
                    try:  # (its answer may still be on the way)
                        return self.ready.result(timeout=_LAST_WORD_TIMEOUT)
                    except TimeoutError:
                        exitcode = peek_exitcode(self) if self._thread is None else None
                        raise RuntimeError(
                            f"{type(self).__name__} stopped before it was ready (exit code {exitcode}); "
                            f"see its log above for the reason"
                        ) from None
                if deadline is not None and time.monotonic() >= deadline:
                    raise

    def _has_ended(self) -> bool:
        """
        Whether the handler's thread or process ended. The process is not reaped: this runs in the server's thread
        while the user's thread may be in shutdown(), and a second ``waitpid`` there would make its join() see
        "no such child" and report the handler as still alive (terminated with a warning, exit code None).
        """
        if self._thread is not None:
            return not self._thread.is_alive()
        return peek_exitcode(self) is not None

    def run_in_thread(self, await_ready: bool = True, timeout: Optional[float] = None) -> None:
        """Serve from a daemon thread of this process (no child process); shutdown() stops it."""
        assert self._thread is None and self._popen is None, "this ConnectionHandler was already started"
        self._thread = threading.Thread(target=self._run_in_thread, name="ConnectionHandler", daemon=True)
        self._thread.start()
        if await_ready:
            self._await_ready(timeout)

    def _run_in_thread(self) -> None:
        try:
            import uvloop

            loop = uvloop.new_event_loop()
        except ImportError:
            loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._serve())
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def is_alive(self) -> bool:
        if self._thread is not None:
            return self._thread.is_alive()
        return super().is_alive()

    def shutdown(self) -> None:
        """Stop serving (unregister the handlers, cancel running requests) and wait for the process / thread."""
        if self.is_alive():
            try:
                self._outer_pipe.send(_SHUTDOWN_COMMAND)
            except (OSError, ValueError):
                pass
            if self._thread is not None:
                self._thread.join(self.shutdown_timeout + _CLEANUP_TIMEOUT)
                if self._thread.is_alive():
                    logger.warning(f"{self.__class__.__name__} thread did not stop within {self.shutdown_timeout} s")
                    return  # it still reads the pipe
            else:
                self.join(self.shutdown_timeout)
                if self.is_alive():
                    logger.warning(f"{type(self).__name__} did not stop within {self.shutdown_timeout} s, terminating")
                    self.terminate()
                    self.join()
        if self._thread is not None or self._popen is not None:  # started and now stopped: release the pipe
            self._inner_pipe.close()
            self._outer_pipe.close()

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        loop.add_reader(self._inner_pipe.fileno(), stop.set)  # a command or EOF (the parent went away) stops us
        # the pipe alone misses a parent killed without clean-up: sibling handlers forked from it hold copies of each
        # other's sending ends (once we end, the copies of the DHT's pipe held here go too, so the DHT process ends)
        stop_watching_parent = stop_when_parent_exits(self, loop, stop.set)  # (None when serving from a thread)
        try:
            try:
                maddr = await loop.run_in_executor(None, self.dht.run_coroutine, _daemon_listen_maddr)
                self._p2p = await P2P.replicate(maddr)
                await self.add_p2p_handlers(self._p2p, balanced=self.balanced)  # (subclasses extend it: petals)
            except BaseException as e:
                logger.debug(f"{self.__class__.__name__} failed to start: {e!r}")
                if not self.ready.done():
                    self.ready.set_exception(e)
                return
            self.ready.set_result(None)
            if mp.current_process() is self:  # a SIGTERM while serving closes the P2P replica (and socket) first
                GracefulSigterm(loop, stop, grace=self.shutdown_timeout).install().serving()
            await stop.wait()
        finally:
            loop.remove_reader(self._inner_pipe.fileno())
            if stop_watching_parent is not None:
                stop_watching_parent()
            if self._p2p is not None:
                await self._close_p2p(self._p2p)

    async def add_p2p_handlers(
        self, p2p: P2P, wrapper: Optional[object] = None, *, namespace: Optional[str] = None, balanced: bool = False
    ) -> None:
        """Serve every rpc_* (the handler calls this when it starts, with its ``balanced``; a subclass may extend it).
        A message of a streamed expert request holds one chunk, so a larger one is refused before it is read; and an
        expert request is scanned for its number of tensors before it is parsed (see request_scan.py), since parsing a
        message of many empty tensors takes ~40x its size in memory. RPCs that a subclass adds or overrides have their
        own rules: they take what any p2p handler takes (petals' rpc_inference sends each step in one message)."""
        implementation = wrapper if wrapper is not None else self
        await asyncio.gather(
            *(
                p2p.add_protobuf_handler(
                    get_handle_name(namespace, type(self).__name__, handler.name),
                    *self._checked_handler(handler, implementation),
                    stream_input=handler.stream_input,
                    stream_output=handler.stream_output,
                    balanced=balanced,
                    max_message_size=MAX_STREAM_MESSAGE_BYTES
                    if self._serves_own(handler)
                    else DEFAULT_MAX_MESSAGE_SIZE,
                )
                for handler in self._get_rpc_handlers()
            )
        )

    def _checked_handler(self, handler, implementation: object) -> Tuple[Callable, Callable]:
        """(method, request type) to register: ExpertRequests are counted on the wire, then unwrapped for it."""
        method = getattr(implementation, handler.name)
        if handler.request_type is not runtime_pb2.ExpertRequest or not self._serves_own(handler):
            return method, handler.request_type  # (a subclass's RPC has its own rules)
        backward = "backward" in handler.name
        schemas = self._get_schemas().values()
        counts = {schema.uid: len(schema.backward_inputs if backward else schema.inputs) for schema in schemas}
        request_type = partial(CheckedExpertRequest, counts, "backward" if backward else "forward")
        if handler.stream_input:
            return (lambda requests, context: method(_unwrap_each(requests), context)), request_type

        async def unwrap_one(request: CheckedExpertRequest, context: P2PContext):
            return await method(request.message, context)

        return unwrap_one, request_type

    def _serves_own(self, handler) -> bool:
        """Whether ``handler`` is ConnectionHandler's own RPC (not one that a subclass adds or overrides)."""
        return getattr(type(self), handler.name) is getattr(ConnectionHandler, handler.name, None)

    async def _close_p2p(self, p2p: P2P) -> None:
        try:
            await await_with_timeout(self.remove_p2p_handlers(p2p), _CLEANUP_TIMEOUT)
        except Exception as e:
            logger.debug(f"Could not unregister the handlers cleanly: {e!r}")
        try:
            await await_with_timeout(p2p.shutdown(), _CLEANUP_TIMEOUT)  # a client: the daemon keeps running
        except Exception as e:
            logger.debug(f"Could not close the P2P client cleanly: {e!r}")

    # ------------------------------------------------------------------ request checks

    def _get_schemas(self) -> Dict[str, ExpertSchema]:
        if self._schemas is None:
            self._schemas = {
                uid: ExpertSchema.from_backend(uid, backend) for uid, backend in self.module_backends.items()
            }
        return self._schemas

    def _get_schema(self, uid: str) -> ExpertSchema:
        schema = self._get_schemas().get(uid)
        if schema is None:
            raise unknown_uid_error(uid, self.module_backends)
        return schema

    def _check_forward(self, schema: ExpertSchema, serialized: Sequence[runtime_pb2.Tensor]):
        what = f"forward of {schema.uid}"
        inputs = decode_tensors(serialized, schema.inputs, what)
        backend_check = getattr(self.module_backends[schema.uid], "check_forward_inputs", None)
        if backend_check is not None:  # the ModuleBackend's own check (same rules, its own wording)
            backend_check(inputs)
        else:
            check_batch(inputs, schema.inputs, schema.max_batch_size, what)
        return inputs

    def _check_backward(self, schema: ExpertSchema, serialized: Sequence[runtime_pb2.Tensor]):
        what = f"backward of {schema.uid} (inputs, then gradients of the outputs)"
        inputs = decode_tensors(serialized, schema.backward_inputs, what)
        backend_check = getattr(self.module_backends[schema.uid], "check_backward_inputs", None)
        if backend_check is not None:
            backend_check(inputs)
        else:
            check_batch(inputs, schema.backward_inputs, schema.max_batch_size, what)
        return inputs

    def _hold(self, context: P2PContext, what: str) -> _HeldBytes:
        """A reservation of request bytes for one call of ``context``'s caller (empty until bytes are added)."""
        if self._bytes_in_flight is None:
            sizes = [schema.max_call_bytes() for schema in self._get_schemas().values()]
            largest = max(sizes, default=0)
            total = self.max_request_bytes_in_flight or max(DEFAULT_BYTES_IN_FLIGHT, 4 * largest)
            # one honest trainer step may call every hosted expert at once, each with up to max_batch_size rows; up
            # to half the total, so that one caller alone never fills it
            per_peer = max(DEFAULT_BYTES_IN_FLIGHT_PER_PEER, 2 * largest, min(sum(sizes), total // 2))
            self._bytes_in_flight = RequestBytesInFlight(
                total, self.max_request_bytes_in_flight_per_peer or min(per_peer, total)
            )
        return _HeldBytes(self._bytes_in_flight, getattr(context, "remote_id", None), what)

    @staticmethod
    async def _run_task(pool, tensors: Sequence[torch.Tensor], caller=None) -> Sequence[torch.Tensor]:
        """Submit one checked task of ``caller`` (a P2PContext) and wait for its result; a cancelled call cancels the
        task. A TaskPool takes the tasks of different callers in turn (a peer's flood does not delay the others')."""
        if "owner" in inspect.signature(pool.submit_task).parameters:
            future = pool.submit_task(*tensors, owner=getattr(caller, "remote_id", None))
        else:  # a pool of another kind (as petals' are), or a TaskPool subclass written for 1.1.12: the tensors only
            future = pool.submit_task(*tensors)
        try:
            outputs = await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            future.cancel()  # the caller went away: drop the task instead of computing it for nobody
            raise
        return outputs if isinstance(outputs, (list, tuple)) else (outputs,)

    async def _forward(self, schema: ExpertSchema, inputs: Sequence[torch.Tensor], caller=None):
        outputs = await self._run_task(self.module_backends[schema.uid].forward_pool, inputs, caller)
        return serialize_outputs(outputs, schema.outputs)

    async def _backward(self, schema: ExpertSchema, inputs: Sequence[torch.Tensor], caller=None):
        grads = await self._run_task(self.module_backends[schema.uid].backward_pool, inputs, caller)
        return serialize_outputs(grads, schema.inputs)

    # ------------------------------------------------------------------ RPCs

    async def rpc_info(self, uid_request: runtime_pb2.ExpertUID, _context: P2PContext) -> runtime_pb2.ExpertInfo:
        uid = uid_request.uid
        if uid not in self.module_backends:
            raise unknown_uid_error(uid, self.module_backends)
        serialized_info = self._infos.get(uid)
        if serialized_info is None:
            info = self.module_backends[uid].get_info()
            serialized_info = self._infos[uid] = MSGPackSerializer.dumps(info)
        return runtime_pb2.ExpertInfo(serialized_info=serialized_info)

    async def rpc_forward(self, request: runtime_pb2.ExpertRequest, caller: P2PContext) -> runtime_pb2.ExpertResponse:
        schema = self._get_schema(request.uid)
        with self._hold(caller, f"forward of {schema.uid}") as held:
            held.add(request_bytes(request.tensors))
            inputs = held.cover(self._check_forward(schema, request.tensors), schema, backward=False)
            return runtime_pb2.ExpertResponse(tensors=await self._forward(schema, inputs, caller))

    async def rpc_backward(self, request: runtime_pb2.ExpertRequest, caller: P2PContext) -> runtime_pb2.ExpertResponse:
        schema = self._get_schema(request.uid)
        with self._hold(caller, f"backward of {schema.uid}") as held:
            held.add(request_bytes(request.tensors))
            inputs = held.cover(self._check_backward(schema, request.tensors), schema, backward=True)
            return runtime_pb2.ExpertResponse(tensors=await self._backward(schema, inputs, caller))

    async def _gather_stream(
        self,
        requests: AsyncIterator[runtime_pb2.ExpertRequest],
        backward: bool,
        context: P2PContext,
        held: _HeldBytes,
    ) -> Tuple[ExpertSchema, List[runtime_pb2.Tensor]]:
        """Collect a streamed request (its bytes held in ``held`` as they arrive) and check that it is complete."""
        collected = StreamedRequest(self._get_schemas(), backward, "backward" if backward else "forward")
        try:
            async for request in aiter_with_timeout(requests, self.stream_stall_timeout):
                received = collected.received_bytes
                collected.add(request)
                held.add(collected.received_bytes - received)
        except asyncio.TimeoutError:
            raise ExpertRequestError(
                f"{collected.what} stream: no message for {self.stream_stall_timeout} s, the request is dropped"
            ) from None
        try:
            return collected.schema, collected.combined()
        except IncompleteStreamError as e:  # its caller died or dropped the connection mid-stream
            self._log_dropped_stream(getattr(context, "remote_id", None), e)
            raise

    def _log_dropped_stream(self, peer, error: IncompleteStreamError) -> None:
        """Log why an incomplete stream was dropped: at INFO at most once per DROPPED_STREAM_LOG_INTERVAL (a hostile
        peer could otherwise flood the log), at DEBUG otherwise."""
        self._dropped_stream_log.log(f"Dropped a streamed request of {peer}: {error}")

    async def rpc_forward_stream(
        self, request_stream: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        with self._hold(context, "forward stream") as held, refusals_named():
            schema, tensors = await self._gather_stream(request_stream, False, context, held)
            inputs = held.cover(self._check_forward(schema, tensors), schema, backward=False)
            outputs = await self._forward(schema, inputs, context)
            for response in split_into_responses(outputs):  # (held until sent: its caller may read it slowly)
                yield response

    async def rpc_backward_stream(
        self, request_stream: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        with self._hold(context, "backward stream") as held, refusals_named():
            schema, tensors = await self._gather_stream(request_stream, True, context, held)
            inputs = held.cover(self._check_backward(schema, tensors), schema, backward=True)
            grads = await self._backward(schema, inputs, context)
            for response in split_into_responses(grads):
                yield response


class _HeldBytes:
    """The request bytes one call holds in its handler's RequestBytesInFlight; all released when the call is done."""

    def __init__(self, budget: RequestBytesInFlight, peer, what: str):
        self.budget, self.peer, self.what, self.size = budget, peer, what, 0

    def add(self, size: int) -> None:
        self.budget.reserve(self.peer, size, self.what)
        self.size += size

    def cover(self, tensors: Sequence[torch.Tensor], schema: ExpertSchema, backward: bool) -> Sequence[torch.Tensor]:
        """Hold at least the bytes of the decoded ``tensors`` (compressed ones decode to up to 8x their wire bytes),
        and those of their answer, kept until its caller reads it (or the write times out); returns the tensors."""
        decoded = sum(tensor.numel() * tensor.element_size() for tensor in tensors)
        rows = tensors[0].shape[0] if tensors and tensors[0].ndim else 0
        self.add(max(decoded - self.size, 0) + schema.answer_bytes(rows, backward))
        return tensors

    def __enter__(self) -> _HeldBytes:
        return self

    def __exit__(self, *_exc_info) -> None:
        self.budget.release(self.peer, self.size)
        self.size = 0


async def _unwrap_each(requests: AsyncIterator[CheckedExpertRequest]) -> AsyncIterator[runtime_pb2.ExpertRequest]:
    async for request in requests:
        yield request.message
