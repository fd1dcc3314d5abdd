"""The reducer side of AllReduceRunner: one ``rpc_aggregate_part`` call per sender, which streams the parts this
peer reduces and gets back, for each part, the weighted average minus what it sent.

A sender must stream exactly as many parts as this peer reduces and then end its stream. Fewer parts, a stall, a
malformed part or a message after the last part get the sender banned (with the reason logged) and refused, and so
do the senders that hold the round up at its last calls (see AllReduceRunner's allreduce_timeout).
"""

from __future__ import annotations

import asyncio
import functools
from typing import AsyncIterator, List, Optional

from hivemind.averaging.group_view import first_part_refusal, group_view_digest
from hivemind.averaging.part_encoding import (
    CHEAP_WIRE_TYPES,
    encode_delta,
    is_private_view,
    refuse_unsafe_part,
    wire_tensor,
)
from hivemind.averaging.partition import AllreduceException, BannedException
from hivemind.p2p import P2PContext, PeerID
from hivemind.p2p.bulk_messages import BulkMessage
from hivemind.p2p.framing import EncodedMessage
from hivemind.proto import averaging_pb2
from hivemind.utils.asyncio import anext, await_with_timeout
from hivemind.utils.logging import get_logger

__all__ = ["ReducerSide", "message_nbytes"]

logger = get_logger(__name__)

AveragingData = averaging_pb2.AveragingData
MessageCode = averaging_pb2.MessageCode
_END = object()
# the round's last calls, as fractions of allreduce_timeout: a reducer excludes the senders that hold it up (but those
# whose steady pace delivers the rest by the final call), then those still holding it up, then stops waiting for the
# parts not delivered yet (a little before the senders' last call, so that its replies to the parts it has are out by
# then), and a sender gives up on the reducers that have not replied to all of its parts
SENDERS_LAST_CALL, SENDERS_FINAL_CALL, PARTS_LAST_CALL, REDUCERS_LAST_CALL = 0.85, 0.90, 0.925, 0.95


def message_nbytes(message) -> int:
    """Bytes of an AveragingData's protobuf encoding (without the stream's framing), computed without encoding it."""
    if isinstance(message, EncodedMessage):
        return sum(memoryview(chunk).nbytes for chunk in message.parts)
    if isinstance(message, BulkMessage):
        bulk = message.bulk
        return message.message.ByteSize() + (0 if bulk is None else memoryview(bulk).nbytes)
    return message.ByteSize()


class ReducerSide:
    """Mixed into AllReduceRunner (which sets every attribute used here): serves the parts this peer reduces."""

    async def rpc_aggregate_part(
        self, stream: AsyncIterator[AveragingData], context: P2PContext
    ) -> AsyncIterator[AveragingData]:
        """Average the parts of one sender with the others' and reply with one delta per part, in part order."""
        task = asyncio.current_task()
        self._handler_tasks.add(task)
        try:
            async for reply in self._serve_sender(stream, context.remote_id):
                yield reply
        finally:
            self._handler_tasks.discard(task)

    async def _serve_sender(
        self, stream: AsyncIterator[AveragingData], peer_id: PeerID
    ) -> AsyncIterator[AveragingData]:
        sender_index = self.sender_index_of.get(peer_id)
        try:
            first = await await_with_timeout(anext(stream), self.sender_timeout)
        except Exception as e:  # a timeout, an empty stream or a broken one
            if sender_index is not None and peer_id != self.peer_id:
                self._ban(sender_index, f"first message did not arrive: {e!r}")
            yield AveragingData(code=MessageCode.INTERNAL_ERROR)
            return
        code = self._check_first_message(first, peer_id, sender_index)
        if code is not None:
            yield AveragingData(code=code)
            return
        self._connected_senders.add(sender_index)
        queue: asyncio.Queue = asyncio.Queue()
        reader = asyncio.create_task(self._read_parts(sender_index, first, stream, queue))
        buffered = self.peer_fractions[self.ordered_peer_ids.index(peer_id)] == 0  # such senders read at the end
        pending_replies: List[AveragingData] = []
        try:
            while True:
                item = await queue.get()
                if item is _END:
                    break
                if isinstance(item, BaseException):
                    raise item
                part, tensor, compression_type, private, future = item
                # the future is shared by every sender of this part: shielded, so that this handler's cancellation
                # (its sender closed the stream) does not cancel the average for the others
                average = await asyncio.shield(future)
                # AVERAGED_PART with average - part encoded as the sender encoded its part; a costly codec runs in a
                # thread, so that the event loop keeps moving other streams. Once averaged, the sender's part is read
                # by nothing else (a sole contributor's part is read only here): the delta may overwrite it
                delta_args = (average, tensor, compression_type, functools.partial(self.container.part_info, part))
                if compression_type in CHEAP_WIRE_TYPES:
                    reply = encode_delta(*delta_args, in_place=private)
                else:
                    reply = await asyncio.get_running_loop().run_in_executor(None, encode_delta, *delta_args)
                if buffered:
                    pending_replies.append(reply)
                else:
                    self.bytes_sent += message_nbytes(reply)
                    yield reply
            for reply in pending_replies:
                self.bytes_sent += message_nbytes(reply)
                yield reply
            # every reply is out; stay until the sender ends its stream (bounded), so that extra parts are noticed
            await asyncio.wait({reader}, timeout=self.sender_timeout)
        except (AllreduceException, asyncio.TimeoutError) as e:
            logger.debug(f"{self}: stopped serving {peer_id}: {e!r}")
            code = MessageCode.CANCELLED if self._cancelled else MessageCode.INTERNAL_ERROR
            yield AveragingData(code=code)
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
            self._ban_if_undelivered(sender_index)

    def _ban_if_undelivered(self, sender_index: int) -> None:
        """A sender whose handler ends before all its parts were taken (its stream closed while parts it had sent still
        waited, unread, for the reduce window: the handler is cancelled then) delivers nothing more: excluded from the
        rest, so that the others' parts are not held for it until the all-reduce times out."""
        reducer = self.reducer
        if self._finalized or reducer is None or not reducer.is_active(sender_index):
            return
        delivered = reducer.sender_progress[sender_index]
        if delivered < reducer.num_parts:
            self._ban(sender_index, f"closed its stream after {delivered} of {reducer.num_parts} parts")

    def _check_first_message(
        self, first: AveragingData, peer_id: PeerID, sender_index: Optional[int]
    ) -> Optional[int]:
        """The code to refuse a call with, or None to serve it."""
        if first.group_id != self.group_id:
            return MessageCode.BAD_GROUP_ID
        if self._cancelled:
            return MessageCode.CANCELLED
        if self._finalized:
            return MessageCode.INTERNAL_ERROR
        if sender_index is None or peer_id == self.peer_id or self.reducer is None:
            logger.warning(f"All-reduce {self.group_id.hex()[:8]}: refused parts from {peer_id}: not a sender here")
            return MessageCode.PROTOCOL_VIOLATION
        if first.code != MessageCode.PART_FOR_AVERAGING:
            self._ban(sender_index, f"first message has code {MessageCode.Name(first.code)}, not PART_FOR_AVERAGING")
            return MessageCode.INTERNAL_ERROR
        refusal = first_part_refusal(first, group_view_digest(self))  # a bad weight, another view of the group
        if refusal is not None:
            self._ban(sender_index, refusal)
            return MessageCode.PROTOCOL_VIOLATION
        if not self.reducer.is_active(sender_index):
            return MessageCode.INTERNAL_ERROR
        if sender_index in self._connected_senders:
            logger.warning(f"All-reduce {self.group_id.hex()[:8]}: refused a second stream from {peer_id}")
            return MessageCode.PROTOCOL_VIOLATION
        return None

    async def _read_parts(
        self, sender_index: int, first: AveragingData, stream: AsyncIterator[AveragingData], queue: asyncio.Queue
    ) -> None:
        weight = first.weight
        num_parts = len(self.my_parts)
        try:
            message = first
            for k, part in enumerate(self.my_parts):
                if k > 0:
                    try:
                        message = await await_with_timeout(anext(stream), self.sender_timeout)
                    except StopAsyncIteration:
                        raise AllreduceException(f"stream ended after {k} of {num_parts} parts") from None
                    except asyncio.TimeoutError:
                        raise AllreduceException(f"part {k} did not arrive within {self.sender_timeout} s") from None
                self.bytes_received += message_nbytes(message)
                tensor = await self._decode(message, part, what=f"part {k}")
                local = self.container.input_part(part)
                refuse_unsafe_part(tensor, weight, local, len(self.sender_peer_ids), what=f"part {k}")
                future = await self.reducer.submit_part(sender_index, k, tensor, weight)
                self._pace.delivered(sender_index, asyncio.get_running_loop().time())
                compression_type = wire_tensor(message)[0].compression
                queue.put_nowait((part, tensor, compression_type, is_private_view(message), future))
            queue.put_nowait(_END)  # every part is in: the replies do not wait for the end of the stream
        except BannedException as e:
            queue.put_nowait(e)
            return
        except Exception as e:
            if not self._finalized:  # (a round ended here, e.g. by our shutdown, is not the sender's fault)
                self._ban(sender_index, str(e) if isinstance(e, AllreduceException) else repr(e))
            queue.put_nowait(e if isinstance(e, AllreduceException) else AllreduceException(repr(e)))
            return
        try:  # a sender streams nothing after its last part: more parts are refused (it is excluded, logged)
            await await_with_timeout(anext(stream), self.sender_timeout)
        except (StopAsyncIteration, asyncio.TimeoutError):
            return
        except Exception as e:
            logger.debug(f"{self}: the stream of {sender_index} broke after its last part: {e!r}")
            return
        self._ban(sender_index, f"sent more than the {num_parts} parts this peer reduces")

    async def _ban_senders_that_never_started(self) -> None:
        await asyncio.sleep(self.sender_timeout)
        for sender_index in range(len(self.sender_peer_ids)):
            if sender_index not in self._connected_senders:
                self._ban(sender_index, f"sent nothing within sender_timeout={self.sender_timeout} s")

    async def _exclude_senders_at_last_call(self) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        final_call = started + SENDERS_FINAL_CALL * self.allreduce_timeout
        await asyncio.sleep(SENDERS_LAST_CALL * self.allreduce_timeout)
        self._exclude_senders_holding_up(SENDERS_LAST_CALL, spare_until=final_call)
        await asyncio.sleep(max(0.0, final_call - loop.time()))
        # those spared that are still behind, and any sender that was only held behind one cut at the last call and
        # holds the round up now (a second dripper would otherwise hold it past the deadline)
        self._exclude_senders_holding_up(SENDERS_FINAL_CALL)
        # no part is waited for any longer (a chain of drippers, each held a few parts ahead of the one before it,
        # would otherwise hold the reduce past the deadline); a little before the senders give up on unanswered
        # reducers, so that the replies to the parts delivered go out (at the same mark they lost that race)
        await asyncio.sleep(max(0.0, started + PARTS_LAST_CALL * self.allreduce_timeout - loop.time()))
        self._exclude_senders_holding_up(PARTS_LAST_CALL, all_behind=True)

    def _exclude_senders_holding_up(
        self, fraction: float, spare_until: Optional[float] = None, all_behind: bool = False
    ) -> None:
        """Exclude the senders that hold the round up: those that have not delivered the oldest part still being
        reduced (the others may lack parts too, but only because the reducer takes few parts ahead of that one: they
        go on). With ``spare_until``, spare those whose pace so far delivers all their parts by then; with
        ``all_behind``, exclude every sender that has not delivered all its parts."""
        reducer, own_index = self.reducer, self.sender_index_of.get(self.peer_id)
        holding_up = reducer.num_parts - 1 if all_behind else min(reducer.current_part_index, reducer.num_parts - 1)
        now, total = asyncio.get_running_loop().time(), reducer.num_parts
        for sender_index in range(len(self.sender_peer_ids)):
            delivered = reducer.sender_progress[sender_index]
            if sender_index == own_index or not reducer.is_active(sender_index) or delivered > holding_up:
                continue
            if spare_until is not None and self._pace.finishes_by(sender_index, delivered, total, spare_until, now):
                continue
            self._note_pace(delivered, total)
            self._ban(
                sender_index,
                f"had delivered {delivered} of {total} parts at the round's last call "
                f"({fraction * 100:g}% of allreduce_timeout={self.allreduce_timeout} s)",
            )
