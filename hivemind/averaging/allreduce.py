"""Butterfly all-reduce over p2p streams: each sender streams every reducer the parts it owns and gets back, for each
part, the weighted average minus what it sent; a peer's own parts never leave the process.

Faults never stop the round for the others: a reducer that fails or stalls leaves its parts at their local values
(zero deltas), and a sender that fails, stalls or sends malformed parts is banned and excluded from the parts it had
not delivered yet.
"""

from __future__ import annotations

import asyncio
import functools
import math
from enum import Enum
from typing import AsyncIterator, Dict, List, Optional, Sequence, Set, Type, Union

import torch

from hivemind.averaging.allreduce_reducer import REDUCERS_LAST_CALL, ReducerSide, message_nbytes
from hivemind.averaging.deadlines import SenderPace
from hivemind.averaging.group_view import group_view_digest
from hivemind.averaging.part_encoding import (
    AnyAveragingData,
    ReceivedAveragingData,
    decode_part,
    difference_as,
    encode_averaging_data,
    refuse_non_finite,
)
from hivemind.averaging.part_math import sub_into, zero_
from hivemind.averaging.partition import (
    DEFAULT_REDUCE_WINDOW,
    AllreduceException,
    PartSpec,
    TensorPartContainer,
    TensorPartReducer,
)
from hivemind.averaging.send_progress import SendProgress
from hivemind.p2p import P2P, PeerID, ServicerBase
from hivemind.p2p.servicer import get_handle_name
from hivemind.proto import averaging_pb2, runtime_pb2
from hivemind.utils.asyncio import anext
from hivemind.utils.logging import get_logger

__all__ = ["AveragingMode", "AllReduceRunner", "AllreduceException"]

logger = get_logger(__name__)

AveragingData = averaging_pb2.AveragingData
MessageCode = averaging_pb2.MessageCode
# read once: protobuf's enum attribute lookup costs microseconds, and these are compared for every part
_AVERAGED_PART, _CANCELLED = MessageCode.AVERAGED_PART, MessageCode.CANCELLED
_PART_FOR_AVERAGING, _NO_CODE = MessageCode.PART_FOR_AVERAGING, MessageCode.NO_CODE
MAX_BYTES_PER_ELEMENT = 16  # of a delta under any codec (complex128 uncompressed)
MAX_REPLY_OVERHEAD = 2**20  # a delta message's fields and codec metadata besides its elements
DEFAULT_REPLY_LINGER = 30.0  # with no reducer_timeout: how long (at most) our replies may take to go out at the end


class AveragingMode(Enum):
    """NODE: sends and reduces; CLIENT: sends, never reduces (no incoming connections); AUX: reduces only."""

    NODE = 0
    CLIENT = 1
    AUX = 2


class AllReduceRunner(ReducerSide, ServicerBase):
    """One all-reduce round of this peer in an assembled group: ``async for delta in runner`` yields, for each local
    tensor in order, ``averaged - local`` (the caller adds it to its tensors); ``rpc_aggregate_part`` serves the
    parts this peer reduces (the averager's handler passes the calls of this group to it).

    :param p2p: this peer's P2P
    :param servicer_type: the class whose handler name is called at the other peers (e.g. ``DecentralizedAverager``)
    :param prefix: the handler namespace at the other peers (the averager's prefix)
    :param group_id: the group's id, sent with the first part and checked by reducers
    :param tensors: local CPU tensors (read, never modified)
    :param weight: this peer's weight in the average (default 1, 0 for AUX peers)
    :param ordered_peer_ids: the group members in the order everyone agreed on
    :param peer_fractions: share of the vector reduced by each member, in the same order (e.g. element counts)
    :param modes: AveragingMode per member (default: CLIENT for members with a zero share, NODE otherwise)
    :param sender_timeout: seconds a reducer waits for a sender's first part (from the start of the round) and for
        each next part; a sender that misses it is banned (None: wait indefinitely)
    :param reducer_timeout: seconds a sender waits for progress of a reducer (a reply, or accepting another part)
        before its remaining parts keep their local values; must exceed ``sender_timeout`` (None: indefinitely). A
        sender with no share of its own (its replies come after all its parts) allows, once all are sent, one such
        period per window of parts for the first reply
    :param allreduce_timeout: seconds the caller gives the whole round (None: unknown). A peer that sends each part
        (or reply) just within those timeouts is never taken for a stalled one, but would make a round of many parts
        outlast this limit, failing it for everyone it exchanges parts with. So at ``SENDERS_LAST_CALL`` of it the
        reducer excludes the senders that hold it up (they have not delivered the oldest part it reduces; the others
        are only held back behind them) unless their pace so far delivers their other parts by ``SENDERS_FINAL_CALL``;
        at that final call, every sender still holding it up; at ``PARTS_LAST_CALL``, every sender that has not
        delivered all its parts (the replies to the parts it has then go out before the senders' last call); and at
        ``REDUCERS_LAST_CALL`` of it this peer gives up on the reducers that have not replied to all of its parts
        (their remaining parts keep their local values, as for failed peers)
    :param container_kwargs: compression, part_size_bytes, tensor_infos, prefetch, output_buffers (see
        TensorPartContainer); with output_buffers, the memory of a yielded delta is written again by a later round
        once no tensor or array references it any more
    """

    def __init__(
        self,
        *,
        p2p: P2P,
        group_id: bytes,
        ordered_peer_ids: Sequence[PeerID],
        peer_fractions: Sequence[float],
        tensors: Sequence[torch.Tensor],
        servicer_type: Type[ServicerBase],
        prefix: Optional[str],
        weight: Optional[float] = None,
        modes: Optional[Sequence[AveragingMode]] = None,
        sender_timeout: Optional[float] = None,
        reducer_timeout: Optional[float] = None,
        allreduce_timeout: Optional[float] = None,
        **container_kwargs,
    ):
        self._p2p, self.peer_id = p2p, p2p.peer_id
        self.servicer_type, self.prefix, self.group_id = servicer_type, prefix, bytes(group_id)
        self.ordered_peer_ids = list(ordered_peer_ids)
        if self.peer_id not in self.ordered_peer_ids:
            raise ValueError(f"this peer ({self.peer_id}) is not in the group {self.ordered_peer_ids}")
        if len(set(self.ordered_peer_ids)) != len(self.ordered_peer_ids):
            raise ValueError("ordered_peer_ids contains duplicates")
        if len(peer_fractions) != len(self.ordered_peer_ids):
            raise ValueError(f"got {len(peer_fractions)} peer_fractions for {len(self.ordered_peer_ids)} peers")
        if modes is None:
            modes = [AveragingMode.CLIENT if fraction == 0 else AveragingMode.NODE for fraction in peer_fractions]
        if len(modes) != len(self.ordered_peer_ids):
            raise ValueError(f"got {len(modes)} modes for {len(self.ordered_peer_ids)} peers")
        self.modes = [AveragingMode(mode) for mode in modes]
        if sender_timeout is not None and reducer_timeout is not None and reducer_timeout <= sender_timeout:
            raise ValueError(
                f"reducer_timeout ({reducer_timeout} s) must be greater than sender_timeout ({sender_timeout} s): a "
                "reducer waits up to sender_timeout for a slow sender before it can answer the others"
            )
        if allreduce_timeout is not None and not (math.isfinite(allreduce_timeout) and allreduce_timeout > 0):
            raise ValueError(f"allreduce_timeout must be a positive number of seconds, got {allreduce_timeout}")
        self.sender_timeout = sender_timeout
        self.reducer_timeout = reducer_timeout
        self.allreduce_timeout = allreduce_timeout
        self._started_at: Optional[float] = None  # (loop time) when the round started
        self._reducers_last_call: Optional[float] = None  # (loop time) set when the round starts
        # how long the round would have needed at the pace of the slowest transfer cut short: a sender cut at a last
        # call, or our parts to a reducer that failed, not stalled (None: none was)
        self.needed_seconds: Optional[float] = None
        self.peer_fractions = [float(fraction) for fraction in peer_fractions]
        self.my_index = self.ordered_peer_ids.index(self.peer_id)
        self.my_mode = self.modes[self.my_index]
        if weight is None:
            weight = 0.0 if self.my_mode == AveragingMode.AUX else 1.0
        weight = float(weight)
        if not (math.isfinite(weight) and weight >= 0):
            raise ValueError(f"weight must be a finite non-negative number, got {weight}")
        self.weight = weight

        self.sender_peer_ids = [
            peer for peer, mode in zip(self.ordered_peer_ids, self.modes) if mode != AveragingMode.AUX
        ]
        self.sender_index_of: Dict[PeerID, int] = {peer: i for i, peer in enumerate(self.sender_peer_ids)}
        self.container = TensorPartContainer(tensors, self.peer_fractions, **container_kwargs)
        self.reducer_indices = [i for i, count in enumerate(self.container.num_parts_by_peer) if count > 0]
        self.my_parts: List[PartSpec] = self.container.parts_by_peer[self.my_index]
        self.reducer: Optional[TensorPartReducer] = None
        if self.my_parts:
            self.reducer = TensorPartReducer(
                [(part.numel,) for part in self.my_parts],
                len(self.sender_peer_ids),
                part_dtypes=[self.container.local_tensors[part.tensor_index].dtype for part in self.my_parts],
            )
        self._connected_senders: Set[int] = set()
        self._pace = SenderPace()  # when each sender's parts arrived (read at the round's last call)
        if self.is_sender and self.reducer is not None:
            self._connected_senders.add(self.sender_index_of[self.peer_id])  # our own parts arrive locally
        self._handler_tasks: Set[asyncio.Task] = set()
        self._started = self._finalized = self._cancelled = False
        self._failed_reducers: Dict[PeerID, str] = {}
        self._encoding_errors: Dict[int, BaseException] = {}  # reducer index -> why our parts could not be sent
        self._lost_parts = 0  # parts whose reducer failed before replying
        self._sent_bytes = self._received_deltas = 0  # bytes of local values sent (before compression), replies
        self.bytes_sent = self.bytes_received = 0  # AveragingData bytes this round put on / took off the wire

    @property
    def is_sender(self) -> bool:
        return self.my_mode != AveragingMode.AUX

    @property
    def group_size(self) -> int:
        return len(self.ordered_peer_ids)

    @property
    def everyone_delivered(self) -> bool:
        """Whether no sender was excluded and no reducer failed in this round (its duration then measures links,
        not a timeout spent waiting for a stalled peer)."""
        banned = self.reducer is not None and bool(self.reducer.banned_reasons)
        return not banned and not self._failed_reducers

    def __repr__(self) -> str:
        return f"{type(self).__name__}(group={self.group_id.hex()[:8]}, peer={self.peer_id}, size={self.group_size})"

    def __aiter__(self) -> AsyncIterator[torch.Tensor]:
        return self.run()

    # ------------------------------------------------------------------ the round, from this peer's point of view

    async def run(self) -> AsyncIterator[torch.Tensor]:
        """Send our parts, reduce the parts we own, and yield one delta (averaged - local) per local tensor."""
        if self._started:
            raise RuntimeError(f"{self} can be iterated only once")
        self._started = True
        self._started_at = asyncio.get_running_loop().time()
        tasks: List[asyncio.Task] = []
        try:
            if self.reducer is not None and self.sender_timeout is not None:
                tasks.append(asyncio.create_task(self._ban_senders_that_never_started()))
            if self.allreduce_timeout is not None:
                self._reducers_last_call = (
                    asyncio.get_running_loop().time() + REDUCERS_LAST_CALL * self.allreduce_timeout
                )
                if self.reducer is not None:
                    tasks.append(asyncio.create_task(self._exclude_senders_at_last_call()))
            if self.is_sender:
                for peer_index in self.reducer_indices:
                    if peer_index == self.my_index:
                        task = asyncio.create_task(self._reduce_own_parts())
                    else:
                        task = asyncio.create_task(self._communicate_with_reducer(peer_index))
                    task.add_done_callback(self._fail_on_unexpected_error)
                    tasks.append(task)
                async for delta in self.container.iterate_output_tensors():
                    yield delta
            if self.reducer is not None:
                await self.reducer.finished.wait()
            self._log_outcome()
            await self._let_replies_finish()
            self.finalize()
        except BaseException as e:
            is_cancel = isinstance(e, (asyncio.CancelledError, GeneratorExit))
            self.finalize(cancel=is_cancel, exception=None if is_cancel else e)
            raise
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for task in list(self._handler_tasks):
                task.cancel()

    def _fail_on_unexpected_error(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            logger.error(f"{self}: internal error: {task.exception()!r}", exc_info=task.exception())
            self.container.fail(task.exception())

    def finalize(self, cancel: bool = False, exception: Optional[BaseException] = None) -> None:
        """End the round: pending and future calls of the other peers are refused (CANCELLED if ``cancel``)."""
        if self._finalized:
            return
        self._finalized, self._cancelled = True, cancel
        failure = exception or AllreduceException(f"{self} was {'cancelled' if cancel else 'finalized'}")
        if self.reducer is not None and not self.reducer.finished.is_set():
            self.reducer.finalize(failure)
        if cancel or exception is not None:
            self.container.fail(failure)

    async def _reduce_own_parts(self) -> None:
        """Our own parts of the parts we reduce: submitted locally, deltas written straight into the output."""
        sender_index = self.sender_index_of[self.peer_id]
        queue: asyncio.Queue = asyncio.Queue()

        async def submit() -> None:
            for k, part in enumerate(self.my_parts):
                local = self.container.input_part(part)
                queue.put_nowait((part, local, await self.reducer.submit_part(sender_index, k, local, self.weight)))

        submitting = asyncio.create_task(submit())
        try:
            for _ in self.my_parts:
                part, local, future = await queue.get()
                average = await asyncio.shield(future)  # shared with the other senders' handlers (see there)
                output = self.container.output_part(part)
                if average is None:
                    zero_(output)
                elif average.dtype == output.dtype or output.dtype.is_floating_point:
                    sub_into(output, average, local)  # (16-bit parts: float32 output, so the step always fits)
                else:
                    output.copy_(difference_as(average, local, output.dtype))
                self.container.mark_part_done(part)
            await submitting
        finally:
            submitting.cancel()
            await asyncio.gather(submitting, return_exceptions=True)

    async def _communicate_with_reducer(self, peer_index: int) -> None:
        """Stream our parts to one reducer and store its deltas; on failure its remaining parts keep local values."""
        peer_id = self.ordered_peer_ids[peer_index]
        # a sender with no share of its own gets its first reply only after the reducer has averaged every part it may
        # still hold: one reducer_timeout per window of parts, once all are sent (see SendProgress)
        windows = max(1, math.ceil(self.container.num_parts_by_peer[peer_index] / DEFAULT_REDUCE_WINDOW))
        progress = SendProgress(first_reply_factor=windows if self.peer_fractions[self.my_index] == 0 else 1)
        exchange = asyncio.create_task(self._exchange_with_reducer(peer_index, progress))
        loop = asyncio.get_running_loop()
        last_call = math.inf if self._reducers_last_call is None else self._reducers_last_call
        stalled = False
        try:
            while not exchange.done():
                if loop.time() >= last_call:
                    exchange.cancel()
                    await asyncio.gather(exchange, return_exceptions=True)
                    raise AllreduceException(
                        f"had not replied to all parts at the round's last call ({REDUCERS_LAST_CALL:.0%} of "
                        f"allreduce_timeout={self.allreduce_timeout} s)"
                    )
                if self.reducer_timeout is None:
                    remaining = last_call - loop.time()
                    await asyncio.wait({exchange}, timeout=None if math.isinf(remaining) else remaining)
                    continue
                limit = progress.limit(self.reducer_timeout)
                remaining = progress.last + limit - loop.time()
                if remaining <= 0:
                    exchange.cancel()
                    await asyncio.gather(exchange, return_exceptions=True)
                    stalled = True
                    raise AllreduceException(f"no progress for {limit} s (reducer_timeout)")
                await asyncio.wait({exchange}, timeout=min(remaining, last_call - loop.time()))
            exchange.result()
        except Exception as e:
            if peer_index in self._encoding_errors:  # our own fault, not the reducer's: fail this peer's step
                cause = self._encoding_errors[peer_index]
                raise AllreduceException(
                    f"All-reduce {self.group_id.hex()[:8]}: could not encode our parts for reducer {peer_id} "
                    f"({cause!r}); this is a bug or an unsupported tensor/compression setting, the step fails "
                    "instead of leaving those parts unaveraged"
                ) from cause
            failed = self.container.register_failed_reducer(peer_index)
            total = self.container.num_parts_by_peer[peer_index]
            if not stalled:  # (a stalled reducer held our parts back: that is not our pace)
                # the parts it replied to got through; with no reply yet (a sender with no share of its own gets its
                # replies at the end) the parts handed to the stream took this long at least: most of a small
                # transfer goes into the stream's buffers at once, so that is all of them but on a slow link
                self._note_pace(total - failed or progress.sent, total)
            self._lost_parts += failed
            self._failed_reducers[peer_id] = str(e)
            logger.warning(
                f"All-reduce {self.group_id.hex()[:8]}: reducer {peer_id} failed after {total - failed} of {total} "
                f"parts: {e}; its other {failed} parts keep their local values"
            )
        finally:
            if not exchange.done():
                exchange.cancel()
                await asyncio.gather(exchange, return_exceptions=True)

    async def _exchange_with_reducer(self, peer_index: int, progress: SendProgress) -> None:
        peer_id = self.ordered_peer_ids[peer_index]
        parts = self.container.parts_by_peer[peer_index]
        # what the servicer's stub does, with replies parsed as ReceivedAveragingData (the deltas are not copied)
        handle_name = get_handle_name(self.prefix, self.servicer_type.__name__, "rpc_aggregate_part")
        requests = self._generate_input_for(peer_index, progress)
        # a delta has the elements of its part: a larger reply is refused before it is read (not after 256 MiB)
        max_reply = MAX_BYTES_PER_ELEMENT * max((part.numel for part in parts), default=0) + MAX_REPLY_OVERHEAD
        replies = await self._p2p.iterate_protobuf_handler(
            peer_id, handle_name, requests, ReceivedAveragingData, max_message_size=max_reply
        )
        try:
            for k, part in enumerate(parts):
                message = await anext(replies, None)
                if message is None:
                    raise AllreduceException(f"closed the stream after {k} of {len(parts)} replies")
                if message.code == _CANCELLED and peer_id in self.sender_index_of:
                    self._ban(self.sender_index_of[peer_id], "cancelled its round")  # it sends no more parts
                if message.code == MessageCode.BAD_GROUP_ID:
                    raise AllreduceException(
                        f"replied BAD_GROUP_ID to part {k}: that member does not run this group (e.g. it stopped "
                        f"waiting for the group before the leader started it, and searched again; or it already "
                        f"finished this round without us, while this peer was stalled)"
                    )
                if message.code != _AVERAGED_PART:
                    raise AllreduceException(f"replied {MessageCode.Name(message.code)} to part {k}")
                self.bytes_received += message_nbytes(message)
                delta = await self._decode(message, part, what=f"delta {k}")
                # checked where it was copied to (aligned, still in cache); if it is refused, the part is not done
                # and keeps its local values like the reducer's other remaining parts
                check = functools.partial(refuse_non_finite, local=self.container.input_part(part), what=f"delta {k}")
                self.container.register_processed_part(peer_index, k, delta, check=check)
                self._received_deltas += 1
                progress.touch(reply=True)
        finally:
            await replies.aclose()

    async def _generate_input_for(self, peer_index: int, progress: SendProgress) -> AsyncIterator[AveragingData]:
        index = -1
        parts = self.container.iterate_parts_for_sending(peer_index)
        try:
            while True:
                try:  # an error here is ours (encoding), not the reducer's: remembered so that it is not taken for one
                    part = await anext(parts, None)
                    if part is None:
                        progress.sent_all = True
                        return
                    index += 1
                    message = self._part_message(part, first=index == 0)
                except Exception as e:
                    self._encoding_errors.setdefault(peer_index, e)
                    raise
                self._sent_bytes += self.container.part_nbytes(peer_index, index)
                self.bytes_sent += message_nbytes(message)
                progress.touch()
                progress.sent += 1
                yield message
        finally:
            await parts.aclose()  # cancels the compression of parts it prepared ahead

    def _part_message(self, part: Union[torch.Tensor, runtime_pb2.Tensor], first: bool) -> AnyAveragingData:
        code = _PART_FOR_AVERAGING if first else _NO_CODE
        group_id, view = (self.group_id, group_view_digest(self)) if first else (b"", b"")
        if isinstance(part, torch.Tensor):  # uncompressed: written from the tensor's memory
            return encode_averaging_data(part, code=code, group_id=group_id, peer_id=view, weight=self.weight)
        if not isinstance(part, runtime_pb2.Tensor):
            raise TypeError(f"expected a tensor or a serialized tensor to send, got {type(part).__name__}")
        message = AveragingData(code=code, group_id=group_id, peer_id=view, weight=self.weight)
        message.tensor_part.CopyFrom(part)
        return message

    async def _decode(self, message: AnyAveragingData, part: PartSpec, what: str) -> torch.Tensor:
        """A part or delta from a peer, checked against the part it must be (size and dtype) before decoding."""
        return await decode_part(message, part.numel, self.container.local_tensors[part.tensor_index].dtype, what)

    def _note_pace(self, done: int, total: int) -> None:
        """A transfer of ``total`` parts was cut with ``done`` of them through: at that pace the round needed
        ``total / done`` times its duration so far (kept in needed_seconds if the longest; nothing done: no pace)."""
        if 0 < done <= total:
            needed = (asyncio.get_running_loop().time() - self._started_at) * total / done
            self.needed_seconds = max(needed, self.needed_seconds or 0.0)

    def _ban(self, sender_index: int, reason: str) -> None:
        if self.reducer is not None and self.reducer.ban_sender(sender_index, reason):
            logger.warning(
                f"All-reduce {self.group_id.hex()[:8]}: excluded sender {self.sender_peer_ids[sender_index]} from "
                f"the parts it had not delivered: {reason}"
            )

    async def _let_replies_finish(self) -> None:
        """Wait a while for our replies to the others to go out, never past the last call (nor time out the round)."""
        handlers = [task for task in self._handler_tasks if task is not asyncio.current_task()]
        if handlers:
            linger = self.reducer_timeout if self.reducer_timeout is not None else DEFAULT_REPLY_LINGER
            if self._reducers_last_call is not None:
                linger = min(linger, max(0.0, self._reducers_last_call - asyncio.get_running_loop().time()))
            await asyncio.wait(handlers, timeout=linger)

    def _log_outcome(self) -> None:
        group = self.group_id.hex()[:8]
        reduced = self.reducer.current_part_index if self.reducer is not None else 0
        logger.debug(
            f"All-reduce {group} ({self.group_size} peers, {self.my_mode.name}): sent {self._sent_bytes} bytes of "
            f"local values to {len([i for i in self.reducer_indices if i != self.my_index])} reducers, received "
            f"{self._received_deltas} deltas, reduced {reduced} parts; {self.bytes_sent} bytes sent and "
            f"{self.bytes_received} bytes received in all"
        )
        if self.reducer is not None and self.reducer.banned_reasons:
            banned = {self.sender_peer_ids[i]: reason for i, reason in self.reducer.banned_reasons.items()}
            logger.warning(f"All-reduce {self.group_id.hex()[:8]}: reduced without senders {banned}")
        if self.is_sender and self._failed_reducers:
            total = len(self.container.parts)
            logger.warning(
                f"All-reduce {self.group_id.hex()[:8]}: received averages for "
                f"{100 * (total - self._lost_parts) / total:.1f}% of the parts; failed reducers: "
                f"{list(self._failed_reducers)}"
            )
