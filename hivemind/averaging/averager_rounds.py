"""The averager's work inside its own process: one step = find a group, wait for the trigger, run the all-reduce,
apply the result; plus the handlers other peers call (join a group, exchange parts, download the state)."""

import asyncio
import time
from typing import Any, AsyncIterator, Dict, List, Optional, Sequence

import torch

from hivemind.averaging.allreduce import AllReduceRunner, AveragingMode
from hivemind.averaging.control import AveragingStage, StepControl
from hivemind.averaging.deadlines import MAX_DEADLINE_SENDERS, MAX_SLOWDOWN, MAX_STRETCH, RoundDeadlines
from hivemind.averaging.group_info import GroupInfo
from hivemind.averaging.load_balancing import load_balance_peers
from hivemind.averaging.matchmaking import MatchmakingException
from hivemind.averaging.output_buffers import ReusableOutputs
from hivemind.averaging.part_encoding import ReceivedAveragingData
from hivemind.averaging.partition import AllreduceException
from hivemind.averaging.payload import decode_group_gathered
from hivemind.averaging.round_turns import RoundTurns
from hivemind.p2p import P2PContext
from hivemind.proto import averaging_pb2
from hivemind.utils.asyncio import achain, anext, as_aiter, await_with_timeout, cancel_and_wait
from hivemind.utils.logging import get_logger

logger = get_logger(__name__)


class _DaemonStopped(AllreduceException):
    """The daemon this averager talks through has stopped: no retry can succeed."""


STEP_FAILED_SHUT_DOWN = "Averaging step failed: the averager was shut down"  # how steps fail when it stops

CANCEL_POLL_PERIOD = 0.05  # how often a running step checks (in shared memory) whether the user cancelled it
TRIGGER_POLL_PERIOD = 0.01  # how often a step waiting for allow_allreduce() checks the trigger (shared memory)
MIN_RETRY_DELAY, MAX_RETRY_DELAY = 0.05, 1.0  # back-off between attempts that failed at once
GROUP_SETUP_TIMEOUT = 5.0  # parts for a group id not (yet) registered here wait this long before BAD_GROUP_ID
MIN_PREFIX_GROUP_ID = 16  # a cancelled group's id this long also covers the ids that extend it (its phases)
MAX_CANCELLED_GROUPS = 64  # the ids of this many recently cancelled groups are remembered (parts for them: CANCELLED)
# and the ids of this many recently ended ones (parts for them: BAD_GROUP_ID at once, not after GROUP_SETUP_TIMEOUT)
MAX_FINISHED_GROUPS = 64
# parts for a group not registered here wait at most this many per sending peer, and this many bytes in all (first
# messages of such streams are held while they wait); beyond either, BAD_GROUP_ID at once. An honest member has one
# group at a time that we may not have registered yet, and parts of a few hundred KiB
MAX_PARKED_PARTS_PER_PEER = 2
MAX_PARKED_PART_BYTES = 128 * 2**20
# what logs say when the bound on the derived deadlines holds them back (see deadlines.py)
_AT_THE_LIMIT = (
    f": the derived deadlines stay within {MAX_SLOWDOWN:g} times what the best measured bandwidth gives (a member "
    "making every round late could otherwise stretch them without end, see docs/averaging.md); if the links are "
    "really this slow now, pass allreduce_timeout"
)


class AveragingRounds:
    """Mixed into DecentralizedAverager; every method here runs in the averager's process and event loop.

    Subclasses may override ``_aggregate_with_group`` (how an assembled group averages) and ``_apply_deltas``.
    """

    def _init_round_state(self) -> None:
        self._running_groups: Dict[bytes, AllReduceRunner] = {}
        self._output_buffers = ReusableOutputs()  # each round's deltas reuse the last round's memory
        self._group_registered = asyncio.Event()
        self._step_tasks: set = set()
        self._cancelled_groups: Dict[bytes, None] = {}  # oldest first
        self._finished_groups: Dict[bytes, None] = {}  # groups whose all-reduce ended here (oldest first)
        self._round_turns = RoundTurns()  # one all-reduce at a time on our tensors, in the order groups formed
        self._parked_bytes = 0  # bytes of first messages waiting for their group to be registered here
        self._parked_per_peer: Dict[Any, int] = {}  # their streams, per sending peer

    # ------------------------------------------------------------------ one step, with retries

    def _start_step(self, control: StepControl) -> None:
        task = asyncio.create_task(self._run_step(control), name=f"averaging step {control!r}")
        self._step_tasks.add(task)
        task.add_done_callback(self._step_tasks.discard)

    async def _run_step(self, control: StepControl) -> None:
        step_task = asyncio.current_task()
        watcher = asyncio.create_task(self._cancel_when_done(control, step_task))
        try:
            await self._step_with_retries(control)
        except asyncio.CancelledError:
            if not control.done():  # the averager is shutting down, not the user's cancellation
                control.set_exception(AllreduceException(STEP_FAILED_SHUT_DOWN))
            if not self._shutting_down:
                return
            raise
        except BaseException as e:  # a bug: never leave the user's step hanging
            logger.exception("Averaging step crashed")
            if not control.done():
                control.set_exception(e)
        finally:
            watcher.cancel()

    @staticmethod
    async def _cancel_when_done(control: StepControl, step_task: asyncio.Task) -> None:
        while not control.done():  # a memory read: the control's state lives in shared memory
            await asyncio.sleep(CANCEL_POLL_PERIOD)
        step_task.cancel()

    async def _step_with_retries(self, control: StepControl) -> None:
        attempt = 0
        last_group_failure: Optional[Exception] = None  # why the last attempt that formed a group failed
        while True:
            attempt += 1
            started = time.monotonic()
            group_info = turn = None
            failed_at_once = False
            try:
                control.stage = AveragingStage.LOOKING_FOR_GROUP
                group_info = await self._find_group(control)
                turn = self._round_turns.join(lambda: control.triggered)
                if not control.triggered:
                    control.stage = AveragingStage.AWAITING_TRIGGER
                    while not control.triggered:
                        await asyncio.sleep(TRIGGER_POLL_PERIOD)
                control.stage = AveragingStage.RUNNING_ALLREDUCE
                await self._round_turns.wait(turn)  # (overlapping rounds would move the tensors twice)
                gathered = await self._aggregate_with_group(group_info, weight=control.weight)
                control.stage = AveragingStage.FINISHED
                if not control.done():
                    control.set_result(gathered)
                return
            except asyncio.CancelledError:
                if group_info is not None:  # the other members may already be sending parts: refuse them at once
                    self._mark_group_cancelled(group_info.group_id)
                raise
            except Exception as e:
                if control.done():
                    return
                timeout = control.get_timeout()
                if isinstance(e, _DaemonStopped):  # no retry can succeed
                    control.stage = AveragingStage.FINISHED
                    control.set_exception(AllreduceException(str(e)))
                    return
                if not control.allow_retries or (timeout is not None and timeout <= 0):
                    control.stage = AveragingStage.FINISHED
                    if group_info is None and last_group_failure is not None:
                        control.set_exception(_with_last_failure(e, last_group_failure))
                    else:
                        control.set_exception(e if isinstance(e, AllreduceException) else _as_step_error(e))
                    return
                if group_info is not None:
                    last_group_failure = e
                logger.warning(f"Averaging step failed (attempt {attempt}), retrying: {type(e).__name__}: {e}")
                failed_at_once = time.monotonic() - started < MAX_RETRY_DELAY
            finally:
                if turn is not None:
                    self._round_turns.leave(turn)  # the next round may go (it must not wait for our back-off)
            if failed_at_once:  # do not spin
                await asyncio.sleep(min(MAX_RETRY_DELAY, MIN_RETRY_DELAY * 2 ** min(attempt, 5)))

    async def _find_group(self, control: StepControl) -> GroupInfo:
        p2p = getattr(self, "_p2p", None)
        if p2p is not None and not p2p.is_alive:  # (matchmaking would only report that nobody was found)
            try:
                p2p._raise_if_daemon_failed()
                reason = "its connection to the daemon is lost"
            except Exception as e:
                reason = str(e)
            raise _DaemonStopped(
                f"Averaging step failed: the p2pd daemon of this peer's DHT stopped ({reason}), so no other peer can "
                f"reach it; shut down this averager and its DHT and create new ones"
            )
        try:
            group_info = await self._matchmaking.look_for_group(control)
        except MatchmakingException as e:
            reason = str(e)
            if reason.lower().startswith("could not find a group"):  # the reason already says it
                reason = reason[len("could not find a group") :].lstrip(" :")
            raise AllreduceException(f"Averaging step failed: could not find a group: {reason}") from e
        if group_info is None:
            raise AllreduceException("Averaging step failed: could not find a group (matchmaking found none)")
        logger.debug(f"Group {group_info.group_id.hex()[:8]}: {group_info.group_size} peers, {group_info.peer_ids}")
        await self._matchmaking.group_key_manager.update_key_on_group_assembled(group_info)
        return group_info

    # ------------------------------------------------------------------ all-reduce in an assembled group

    async def _aggregate_with_group(self, group_info: GroupInfo, weight: float) -> Dict[Any, Any]:
        """Average the tensors with ``group_info``'s members; returns the gathered user objects by peer id."""
        infos, user_gathered = decode_group_gathered(group_info.peer_ids, group_info.gathered)
        modes = [AveragingMode(info.mode) for info in infos]
        bandwidths = [0.0 if mode == AveragingMode.CLIENT else info.bandwidth for mode, info in zip(modes, infos)]
        counts = load_balance_peers(self.total_size, bandwidths, self.min_vector_size)
        fractions = [count / max(self.total_size, 1) for count in counts]
        vector_bytes = sum(tensor.numel() * tensor.element_size() for tensor in self._averaged_tensors)
        deadlines = self._deadlines.for_round(vector_bytes, group_info.group_size, self.part_size_bytes)
        runner = AllReduceRunner(
            p2p=self._p2p,
            servicer_type=type(self),
            prefix=self.prefix,
            group_id=group_info.group_id,
            tensors=self._averaged_tensors,
            weight=weight,
            ordered_peer_ids=group_info.peer_ids,
            peer_fractions=fractions,
            modes=modes,
            sender_timeout=deadlines.sender_timeout,
            reducer_timeout=deadlines.reducer_timeout,
            allreduce_timeout=deadlines.allreduce_timeout,
            compression=self.compression,
            part_size_bytes=self.part_size_bytes,
            tensor_infos=self.tensor_infos,
            output_buffers=self._output_buffers,
        )
        started = time.perf_counter()
        self._register_group(group_info.group_id, runner)
        cancelled = False
        try:
            deltas = await await_with_timeout(self._collect_deltas(runner), deadlines.allreduce_timeout)
        except asyncio.TimeoutError:
            runner.finalize(exception=AllreduceException("the all-reduce ran out of time"))
            raise AllreduceException(
                f"Averaging step failed: the all-reduce did not finish within {deadlines.allreduce_timeout:.1f} s"
                f"{_AT_THE_LIMIT if deadlines.limited else ''}"
            ) from None
        except BaseException as e:
            cancelled = isinstance(e, asyncio.CancelledError)
            runner.finalize(cancel=cancelled, exception=e)
            raise
        finally:
            self._running_groups.pop(group_info.group_id, None)
            if not cancelled:  # (a cancelled one is marked as such once the step has undone its work: CANCELLED)
                _remember(self._finished_groups, group_info.group_id, MAX_FINISHED_GROUPS)
        if self.mode != AveragingMode.AUX:
            if len(deltas) != len(self._averaged_tensors):
                raise AllreduceException(
                    f"Averaging step failed: the all-reduce returned {len(deltas)} of "
                    f"{len(self._averaged_tensors)} tensors; local tensors were left unchanged"
                )
            await self._apply_in_thread(deltas)
        elapsed = time.perf_counter() - started
        if runner.everyone_delivered:  # a round that waited out a stalled peer says nothing about the links
            self._deadlines.record_round(vector_bytes, group_info.group_size, elapsed, deadlines)
            if self._deadlines.for_round(vector_bytes, group_info.group_size, self.part_size_bytes).limited:
                logger.info(
                    f"This round took {elapsed:.1f} s of allreduce_timeout={deadlines.allreduce_timeout:.1f} s"
                    f"{_AT_THE_LIMIT}"
                )
        elif runner.needed_seconds is not None:  # but one that cut a slow transfer short says how long it needed
            self._learn_from_cut_round(deadlines, runner.needed_seconds)
        logger.info(
            f"Averaged {vector_bytes} bytes with {group_info.group_size} peers in {elapsed:.3f} s (sent "
            f"{runner.bytes_sent} bytes, received {runner.bytes_received} bytes)"
        )
        return user_gathered

    def _learn_from_cut_round(self, deadlines: RoundDeadlines, needed_seconds: float) -> None:
        before = self._deadlines.stretch
        self._deadlines.record_cut_round(deadlines, needed_seconds)
        if deadlines.limited:
            logger.warning(
                f"This round cut a slow transfer at its last call: at its pace the round needed ~{needed_seconds:.1f} "
                f"s of allreduce_timeout={deadlines.allreduce_timeout:.1f} s{_AT_THE_LIMIT}"
            )
            return
        if self._deadlines.stretch > before:
            logger.info(
                f"This round cut a slow transfer at its last call: at its pace the round needed "
                f"~{needed_seconds:.1f} s of allreduce_timeout={deadlines.allreduce_timeout:.1f} s; the next rounds' "
                f"derived allreduce_timeout is {self._deadlines.stretch:.3g} times what the measured bandwidth gives "
                f"(was {before:.3g}; at most {MAX_STRETCH:g}; pass allreduce_timeout to set it yourself)"
            )

    @staticmethod
    async def _collect_deltas(runner: AllReduceRunner) -> List[torch.Tensor]:
        return [delta async for delta in runner]

    async def _apply_in_thread(self, deltas: Sequence[torch.Tensor]) -> None:
        """Run :meth:`_apply_deltas` in a thread. A cancellation meanwhile (the user's, or a shutdown) waits for the
        thread, which moves the tensors anyway: the next round must not read them while they are half moved."""
        applying = asyncio.get_running_loop().run_in_executor(None, self._apply_deltas, deltas)
        try:
            await asyncio.shield(applying)
        except asyncio.CancelledError:
            await asyncio.wait({applying})
            raise

    def _apply_deltas(self, deltas: Sequence[torch.Tensor]) -> None:
        """Move the local tensors towards the average (only after the whole all-reduce succeeded). Tensors whose
        memory overlaps another's (the same tensor passed twice, e.g. tied weights of a state_dict; overlapping
        views) get their new values computed first and written after: in place, the overlap would move twice."""
        with self.lock_averaged_tensors, torch.no_grad():
            overlapping = _overlapping_indices(self._averaged_tensors)
            staged = []
            for index, (tensor, delta) in enumerate(zip(self._averaged_tensors, deltas)):
                if index in overlapping:
                    staged.append((tensor, self._apply_delta(tensor.clone(), delta)))
                else:
                    self._apply_delta(tensor, delta)
            for tensor, value in staged:
                tensor.copy_(value)

    def _apply_delta(self, tensor: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        if tensor.is_floating_point() or tensor.is_complex():
            # a float16/bfloat16 tensor's delta is float32: the sum is rounded once, to the average
            return tensor.add_(delta.to(device=tensor.device), alpha=self.averaging_alpha)
        delta = delta.to(device=tensor.device, dtype=tensor.dtype)
        if self.averaging_alpha == 1.0:
            return tensor.add_(delta)  # (torch refuses a float alpha for integers) wraps to the rounded average
        # move a rounded fraction of the way to that average, computed in int64
        own = tensor.to(torch.int64)
        moved = ((tensor + delta).to(torch.int64) - own).to(torch.float64).mul_(self.averaging_alpha)
        return tensor.copy_(own.add_(moved.round_().to(torch.int64)))

    def _register_group(self, group_id: bytes, runner: AllReduceRunner) -> None:
        """Make ``runner`` answer the parts other members send for ``group_id``."""
        if group_id in self._running_groups:
            raise AllreduceException(f"group id {group_id.hex()} is already running here")
        self._running_groups[group_id] = runner
        self._wake_group_waiters()

    def _mark_group_cancelled(self, group_id: bytes) -> None:
        _remember(self._cancelled_groups, group_id, MAX_CANCELLED_GROUPS)
        self._wake_group_waiters()

    def _wake_group_waiters(self) -> None:
        """Wake the handlers waiting (in :meth:`_wait_for_group`) for a group to be registered or cancelled."""
        self._group_registered.set()
        self._group_registered = asyncio.Event()

    def _is_cancelled_group(self, group_id: bytes) -> bool:
        """Whether ``group_id`` is (a phase of) a group whose step this averager cancelled after joining it."""
        if group_id in self._cancelled_groups:
            return True
        # a phase's id extends the group's (e.g. PowerSGD's); a very short id from a leader never matches others'
        return any(len(g) >= MIN_PREFIX_GROUP_ID and group_id.startswith(g) for g in self._cancelled_groups)

    async def _wait_for_group(self, group_id: bytes, timeout: float) -> Optional[AllReduceRunner]:
        deadline = time.monotonic() + timeout
        while group_id not in self._running_groups and not self._is_cancelled_group(group_id):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            try:
                await await_with_timeout(self._group_registered.wait(), remaining)
            except asyncio.TimeoutError:
                return None
        return self._running_groups.get(group_id)

    async def _cancel_steps(self) -> None:
        for task in list(self._step_tasks):
            await cancel_and_wait(task)
        for runner in list(self._running_groups.values()):
            runner.finalize(cancel=True)

    # ------------------------------------------------------------------ handlers served under the prefix

    async def rpc_join_group(
        self, request: averaging_pb2.JoinRequest, context: P2PContext
    ) -> AsyncIterator[averaging_pb2.MessageFromLeader]:
        """A peer asks to join the group this averager gathers (see Matchmaking)."""
        matchmaking = getattr(self, "_matchmaking", None)
        if matchmaking is None:
            yield averaging_pb2.MessageFromLeader(code=averaging_pb2.NOT_LOOKING_FOR_GROUP)
            return
        async for message in matchmaking.rpc_join_group(request, context):
            yield message

    async def rpc_aggregate_part(
        self,
        stream: AsyncIterator[ReceivedAveragingData],  # AveragingData on the wire; tensor bytes are not copied
        context: P2PContext,
    ) -> AsyncIterator[averaging_pb2.AveragingData]:
        """A group member sends its parts for this averager to reduce; they are routed by group id."""
        try:
            first = await await_with_timeout(anext(stream), self._first_part_timeout())
        except (StopAsyncIteration, asyncio.TimeoutError):
            logger.debug(f"{context.remote_id} opened an all-reduce stream and sent nothing")
            return
        # a member may still be setting up the group that its peers already started: give it time to register
        runner = self._running_groups.get(first.group_id)
        if runner is None and first.group_id in self._finished_groups and not self._is_cancelled_group(first.group_id):
            # (a member that was stalled past the round, which the others finished without it: nothing will come)
            logger.debug(f"{context.remote_id} sent parts for group {first.group_id.hex()[:8]}, which ended here")
            yield averaging_pb2.AveragingData(code=averaging_pb2.MessageCode.BAD_GROUP_ID)
            return
        if runner is None and not self._is_cancelled_group(first.group_id):
            runner = await self._wait_for_group_parked(first, context.remote_id)
        if runner is None and self._is_cancelled_group(first.group_id):
            logger.debug(f"{context.remote_id} sent parts for group {first.group_id.hex()[:8]}, cancelled here")
            yield averaging_pb2.AveragingData(code=averaging_pb2.MessageCode.CANCELLED)  # its senders drop it now
            return
        if runner is None:
            logger.debug(f"{context.remote_id} sent parts for an unknown group {first.group_id.hex()}")
            refusal = averaging_pb2.AveragingData(code=averaging_pb2.BAD_GROUP_ID)
            yield refusal
            return
        async for message in runner.rpc_aggregate_part(achain(as_aiter(first), stream), context):
            yield message

    async def _wait_for_group_parked(self, first: ReceivedAveragingData, sender) -> Optional[AllReduceRunner]:
        """Wait for the group of ``first`` to be registered, holding ``first`` within the parking limits (None if
        it is not registered in time, or if waiting would exceed the sender's or the total limit)."""
        bulk = getattr(first, "bulk", None)  # a ReceivedAveragingData keeps the tensor bytes apart from the message
        size = getattr(first, "message", first).ByteSize() + (bulk.nbytes if bulk is not None else 0)
        streams = self._parked_per_peer.get(sender, 0)
        if streams >= MAX_PARKED_PARTS_PER_PEER or self._parked_bytes + size > self._parked_bytes_limit():
            logger.debug(
                f"{sender} sent parts for group {first.group_id.hex()[:8]}, not registered here; refused at once: "
                f"{streams} of its streams and {self._parked_bytes} bytes already wait for unknown groups"
            )
            return None
        self._parked_per_peer[sender] = streams + 1
        self._parked_bytes += size
        try:
            return await self._wait_for_group(first.group_id, max(self.request_timeout, GROUP_SETUP_TIMEOUT))
        finally:
            self._parked_bytes -= size
            self._parked_per_peer[sender] -= 1
            if not self._parked_per_peer[sender]:
                del self._parked_per_peer[sender]

    def _parked_bytes_limit(self) -> int:
        """Bytes of first messages that may wait for groups not registered here: MAX_PARKED_PART_BYTES, or the first
        parts of 16 senders when this averager was configured with parts so large that those exceed it (honest
        members whose group is still being set up here must not be refused)."""
        return max(MAX_PARKED_PART_BYTES, 16 * (self.part_size_bytes + 2**20))

    def _first_part_timeout(self) -> float:
        """How long a sender's stream may take to bring its first part: the sender timeout of a round in the largest
        group this averager's deadlines account for (the part names its group), at least the floor. A slow link that
        the measured rounds already wait for is not dropped here at the floor."""
        vector_bytes = sum(tensor.numel() * tensor.element_size() for tensor in self._averaged_tensors)
        largest = self._deadlines.for_round(vector_bytes, MAX_DEADLINE_SENDERS + 1, self.part_size_bytes)
        return max(self._deadlines.min_sender_timeout, largest.sender_timeout)

    async def rpc_download_state(
        self, request: averaging_pb2.DownloadRequest, context: P2PContext
    ) -> AsyncIterator[averaging_pb2.DownloadData]:
        """A peer downloads this averager's state (see StateSharing)."""
        state_sharing = getattr(self, "_state_sharing", None)
        if state_sharing is None:
            return
        async for message in state_sharing.rpc_download_state(request, context):
            yield message


def _as_step_error(error: Exception) -> AllreduceException:
    wrapped = AllreduceException(f"Averaging step failed: {type(error).__name__}: {error}")
    wrapped.__cause__ = error
    return wrapped


def _with_last_failure(error: Exception, last_failure: Exception) -> AllreduceException:
    """The final error of a step whose retries ended without a group (``error``), naming why the last attempt that
    did form a group failed: that is usually the real, repeated cause (the text survives the trip to the user's
    process, where the exception chain does not)."""
    wrapped = AllreduceException(
        f"{error}; the last attempt that formed a group failed with {last_failure!r} (see the warnings for every "
        f"attempt)"
    )
    wrapped.__cause__ = last_failure
    return wrapped


def _remember(group_ids: Dict[bytes, None], group_id: bytes, limit: int) -> None:
    """Add ``group_id`` to an insertion-ordered set of ids, forgetting the oldest beyond ``limit``."""
    group_ids[group_id] = None
    while len(group_ids) > limit:
        del group_ids[next(iter(group_ids))]


def _overlapping_indices(tensors: Sequence[torch.Tensor]) -> set:
    """Indices of the tensors whose span of memory intersects another tensor's (a superset of those that share
    elements: interleaved views such as ``x[::2]`` and ``x[1::2]`` are included too)."""
    spans = []
    for index, tensor in enumerate(tensors):
        if tensor.numel() > 0:
            extent = 1 + sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride()))
            start = tensor.data_ptr()
            spans.append((start, start + extent * tensor.element_size(), index))
    spans.sort()
    overlapping, reach, reach_index = set(), None, None
    for start, stop, index in spans:
        if reach is not None and start < reach:
            overlapping.update((index, reach_index))
        if reach is None or stop > reach:
            reach, reach_index = stop, index
    return overlapping
