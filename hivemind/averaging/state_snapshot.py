"""The state a donor streams: taken once, in one block of shared memory, and shared by the downloads that overlap.

A donor's averager process gets its state from the user's process (``get_current_state`` may be overridden there).
:func:`pack_tensors` puts the state's tensors into one shared-memory buffer, so that crossing into the averager's
process costs one file descriptor and no copy (tensors that already are views of one such buffer, as the default
``get_current_state`` makes them, are not copied at all); :meth:`PackedTensors.unpack` gives views of that buffer.

:class:`SnapshotCache` then lets the downloads that run at the same time stream the same snapshot instead of one copy
each: a download reuses the newest snapshot that another download still streams if that snapshot is at most ``max_age``
seconds old, or (when ``max_snapshots`` of them are already in use) if it is at most ``age_cap`` seconds old; otherwise
it takes a new one, or, when ``max_snapshots`` are in use and the newest is older than ``age_cap`` (downloads so slow
that they keep old snapshots alive), it refuses the download with :class:`DonorBusyError` so that the newcomer tries
another donor rather than receive a stale state. Downloads that start while a snapshot is being taken wait for it. A
snapshot is dropped as soon as its last download ends. So a donor holds at most ``max_snapshots`` copies of its state
however many peers download it, and each download sends exactly what one ``get_current_state`` call returned (never a
mix of two moments). Snapshots taken back to back use at most a tenth of the donor's time (``SNAPSHOT_DUTY_CYCLE``)
once a short burst is spent (``SNAPSHOT_BURST`` seconds of copying, so that a donor that was idle serves a few
newcomers in a row without delay): past it, after a snapshot that took ``t`` seconds the next one starts about ``9 t``
seconds (at most 5 s) later, and the downloads that arrive meanwhile share it; else a peer that opens downloads and
closes them at once could keep a donor copying.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import math
import multiprocessing.connection
import threading
import time
from dataclasses import dataclass, field
from typing import (
    Any,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    List,
    NamedTuple,
    Optional,
    Sequence,
    Set,
    Tuple,
)

import torch

from hivemind.compression import CompressionInfo
from hivemind.utils.asyncio import await_with_timeout, cancel_and_wait
from hivemind.utils.logging import get_logger

__all__ = [
    "DonorBusyError",
    "PackedTensors",
    "pack_tensors",
    "packed_copy",
    "empty_packed",
    "describing_state",
    "describe_state",
    "is_describing_state",
    "send_packed_state",
    "await_state_answer",
    "StateSnapshot",
    "SnapshotCache",
    "SNAPSHOT_AGE_CAP",
    "SNAPSHOT_BURST",
    "SNAPSHOT_DUTY_CYCLE",
]

logger = get_logger(__name__)

ALIGNMENT = 64  # bytes: every tensor starts at a multiple of this in the shared buffer (any dtype can view it)
# seconds: a snapshot older than this is never handed to a new download (when none newer can be taken, the download
# is refused as busy), so that slow downloads that keep old snapshots in use cannot make a donor send a stale state
SNAPSHOT_AGE_CAP = 60.0
# taking snapshots one after another uses at most this share of the donor's time (beyond SNAPSHOT_BURST): a budget
# of snapshot time grows by SNAPSHOT_DUTY_CYCLE seconds per second up to SNAPSHOT_BURST, each snapshot spends its
# duration, and none starts while the budget is below zero (the wait is at most MAX_SNAPSHOT_PAUSE). After a snapshot
# of t seconds with the burst spent, the next waits t * (1 / SNAPSHOT_DUTY_CYCLE - 1) seconds. So a downloader that
# opens a download and closes it at once, over and over, cannot make a donor copy its state nonstop
SNAPSHOT_DUTY_CYCLE = 0.1
SNAPSHOT_BURST = 2.0  # seconds of snapshot time a donor that was idle may spend back to back before any pause
MAX_SNAPSHOT_PAUSE = 5.0  # seconds; within the time a newcomer allows a donor before its first message


DONOR_BUSY_HINT = "try another peer or retry later"  # ends every DonorBusyError message: newcomers retry such donors


class DonorBusyError(RuntimeError):
    """This donor already serves (and queues) as many state downloads as it allows; the caller should try another."""


class TensorLayout(NamedTuple):
    offset: int  # bytes from the start of the buffer
    shape: Tuple[int, ...]
    dtype: torch.dtype
    requires_grad: bool


class PackedTensors(NamedTuple):
    """Tensors laid out in one shared-memory buffer: picklable across processes at the cost of one descriptor."""

    buffer: torch.Tensor  # uint8, 1-D, in shared memory
    layouts: Tuple[TensorLayout, ...]

    def unpack(self) -> List[torch.Tensor]:
        """The tensors, as views of the buffer (no copy)."""
        return [_view(self.buffer, layout) for layout in self.layouts]


def _nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def _view(buffer: torch.Tensor, layout: TensorLayout) -> torch.Tensor:
    size = _nbytes(layout.shape, layout.dtype)
    tensor = buffer[layout.offset : layout.offset + size].view(layout.dtype).view(layout.shape)
    if layout.requires_grad:
        tensor.requires_grad_(True)
    return tensor


def _shared_buffer(nbytes: int) -> torch.Tensor:
    storage = torch.UntypedStorage._new_shared(max(nbytes, 1))  # (an empty mapping is refused)
    return torch.empty(0, dtype=torch.uint8).set_(storage)


def _aligned_layouts(specs: Iterable[Tuple[Sequence[int], torch.dtype, bool]]) -> Tuple[Tuple[TensorLayout, ...], int]:
    """Layouts of tensors ``(shape, dtype, requires_grad)`` one after another in a buffer, each starting at a multiple
    of ALIGNMENT; and the bytes that buffer needs."""
    layouts, offset = [], 0
    for shape, dtype, requires_grad in specs:
        layouts.append(TensorLayout(offset, tuple(shape), dtype, requires_grad))
        offset += -(-_nbytes(shape, dtype) // ALIGNMENT) * ALIGNMENT
    return tuple(layouts), offset


def empty_packed(shapes_and_dtypes: Iterable[Tuple[Sequence[int], torch.dtype]]) -> List[torch.Tensor]:
    """New tensors of these shapes and dtypes (contents unset), as views of one new shared-memory buffer."""
    layouts, nbytes = _aligned_layouts((shape, dtype, False) for shape, dtype in shapes_and_dtypes)
    return PackedTensors(_shared_buffer(nbytes), layouts).unpack()


def _packed_in_place(tensors: Sequence[torch.Tensor]) -> Optional[PackedTensors]:
    """The layout of ``tensors`` if they are contiguous CPU views of one shared storage, else None."""
    if not tensors or not all(isinstance(t, torch.Tensor) and t.device.type == "cpu" for t in tensors):
        return None
    storage = tensors[0].untyped_storage()
    if not tensors[0].is_shared():
        return None
    layouts = []
    for tensor in tensors:
        if tensor.untyped_storage().data_ptr() != storage.data_ptr() or not tensor.is_contiguous():
            return None
        offset = tensor.storage_offset() * tensor.element_size()
        layouts.append(TensorLayout(offset, tuple(tensor.shape), tensor.dtype, tensor.requires_grad))
    buffer = torch.empty(0, dtype=torch.uint8).set_(storage)
    return PackedTensors(buffer, tuple(layouts))


def pack_tensors(tensors: Sequence[torch.Tensor], reuse: bool = True) -> PackedTensors:
    """``tensors`` in one shared-memory buffer: copied there (from any device, with any strides), or, with ``reuse``
    and if they already are contiguous views of one shared buffer, as they are. Raises TypeError for non-tensors."""
    tensors = list(tensors)
    for index, tensor in enumerate(tensors):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"state tensor {index} is a {type(tensor).__name__}, not a torch.Tensor")
    packed = _packed_in_place(tensors) if reuse else None
    if packed is not None:
        return packed
    layouts, nbytes = _aligned_layouts((tensor.shape, tensor.dtype, tensor.requires_grad) for tensor in tensors)
    packed = PackedTensors(_shared_buffer(nbytes), layouts)
    with torch.no_grad():
        for tensor, layout in zip(tensors, layouts):
            _view(packed.buffer, layout._replace(requires_grad=False)).copy_(tensor.detach())
    return packed


def packed_copy(tensors: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """Detached copies of ``tensors`` in one shared-memory buffer: they reach the averager's process with no further
    copy. Within :func:`describing_state` (in the same thread) it copies nothing and returns tensors of the same
    shapes and dtypes without data (on the "meta" device)."""
    if getattr(_describing, "active", False):
        return [torch.empty_like(tensor, device="meta") for tensor in tensors]
    return pack_tensors([tensor.detach() for tensor in tensors], reuse=False).unpack()


_describing = threading.local()


def is_describing_state() -> bool:
    """Whether this thread runs within :func:`describing_state` (only shapes and dtypes of the state are wanted)."""
    return getattr(_describing, "active", False)


@contextlib.contextmanager
def describing_state() -> Iterator[None]:
    """Within this block, in this thread, :func:`packed_copy` copies nothing: see :func:`describe_state`."""
    previous = getattr(_describing, "active", False)
    _describing.active = True
    try:
        yield
    finally:
        _describing.active = previous


def describe_state(get_current_state: Callable[[], Sequence[Any]]) -> List[Tuple[Tuple[int, ...], torch.dtype]]:
    """The shape and dtype of each tensor that ``get_current_state()`` returns, at the cost of no copy of them where
    it copies with :func:`packed_copy` (as the averager's and the optimizer's do).

    A newcomer calls its own ``get_current_state`` only to learn what a downloaded state must look like; a full copy
    would cost a second state's worth of memory and the time to copy it for a result that is dropped at once. So it
    is called within :func:`describing_state`, where its copies are tensors without data: changing them in place
    changes nothing. Should it fail on those (e.g. it reads values from them), it is called once more as usual."""

    def shapes_and_dtypes() -> List[Tuple[Tuple[int, ...], torch.dtype]]:
        _, tensors, *_ = get_current_state()
        return [(tuple(tensor.shape), tensor.dtype) for tensor in tensors]  # (an iterable may be lazy: consume it)

    try:
        with describing_state():
            return shapes_and_dtypes()
    except Exception as e:
        logger.debug(f"get_current_state() failed on tensors without data ({e!r}); calling it with real copies")
        return shapes_and_dtypes()


# Handing a packed state to another process: pickling its buffer gives a duplicate of the buffer's descriptor to
# multiprocessing's resource sharer in the sending process, which keeps it until the receiving process unpickles it.
# A state that is never unpickled there (its receiver gave up on it, or exited) would keep a whole copy of the state
# allocated in the sender for as long as the sender lives. So the averager's process keeps waiting for an answer it
# asked for even when the download that wanted it is gone, and the user's process sends nothing to a receiver that
# already gave up or exited.
_awaited_answers: Set[concurrent.futures.Future] = set()  # answers asked for, kept until they arrive


async def await_state_answer(future: concurrent.futures.Future) -> Any:
    """``await future`` (an MPFuture answered by the user's process); cancelling the caller does not cancel
    ``future``: it is kept until answered, so that a state it brings is received (and freed) rather than stranded."""
    _awaited_answers.add(future)
    future.add_done_callback(_awaited_answers.discard)
    answer = asyncio.wrap_future(future)
    answer.add_done_callback(lambda done: done.cancelled() or done.exception())  # (nobody may be left to look)
    return await asyncio.shield(answer)


def send_packed_state(future: concurrent.futures.Future, state: Sequence[Any], receiver_sentinel: int) -> bool:
    """Answer ``future`` (an MPFuture of another process) with ``(metadata, tensors, *rest)``, the tensors packed in
    one shared-memory buffer; unless the future is already done (e.g. its receiver cancelled it) or the receiver's
    process exited (``receiver_sentinel``: its ``Process.sentinel``): then nothing is sent (see above).
    Returns whether it was sent."""
    if future.done() or multiprocessing.connection.wait([receiver_sentinel], timeout=0):
        return False
    metadata, tensors, *rest = state
    future.set_result((metadata, pack_tensors(tensors), *rest))
    return True


@dataclass(eq=False)
class StateSnapshot:
    """One state taken from ``get_current_state``: what a download streams."""

    metadata: Any
    tensors: List[torch.Tensor]
    infos: List[CompressionInfo]
    taken_at: float = field(default_factory=time.monotonic)
    users: int = 0  # downloads streaming it now

    @property
    def age(self) -> float:
        return time.monotonic() - self.taken_at


class _Taking:
    """A snapshot being taken, and how many downloads wait for it."""

    def __init__(self):
        self.task: Optional[asyncio.Task] = None
        self.waiters = 0


class SnapshotCache:
    """Hands out state snapshots to downloads, sharing one between downloads that overlap (see the module's doc).

    :param get_current_state: ``async () -> (metadata, tensors[, infos])``; infos may be None or left out
    :param max_age: seconds for which a snapshot in use is reused by a new download
    :param max_snapshots: snapshots in use at most; beyond, new downloads reuse the newest if at most ``age_cap``
      seconds old, else they are refused with :class:`DonorBusyError`
    :param timeout: seconds allowed for ``get_current_state``
    :param age_cap: seconds: an older snapshot is never handed to a new download
    :param duty_cycle: the share of time that taking snapshots back to back may use at most (see SNAPSHOT_DUTY_CYCLE)
    :param burst: seconds of snapshot time that may be spent back to back before ``duty_cycle`` applies
    """

    def __init__(
        self,
        get_current_state: Callable[[], Awaitable[Tuple[Any, Sequence[torch.Tensor], Any]]],
        max_age: float,
        max_snapshots: int = 2,
        timeout: Optional[float] = None,
        age_cap: float = SNAPSHOT_AGE_CAP,
        duty_cycle: float = SNAPSHOT_DUTY_CYCLE,
        burst: float = SNAPSHOT_BURST,
    ):
        if max_snapshots < 1 or not max_age >= 0 or not age_cap >= max_age:
            raise ValueError(
                f"need max_snapshots >= 1 and 0 <= max_age <= age_cap, got {max_snapshots}, {max_age} and {age_cap}"
            )
        if not 0 < duty_cycle <= 1:
            raise ValueError(f"duty_cycle must be in (0, 1], got {duty_cycle}")
        if not burst >= 0:
            raise ValueError(f"burst must be a non-negative number of seconds, got {burst}")
        self.duty_cycle, self.burst = duty_cycle, burst
        self._budget, self._budget_at = burst, time.monotonic()  # seconds of snapshot time available, and when
        self.get_current_state, self.max_age, self.max_snapshots = get_current_state, max_age, max_snapshots
        self.age_cap = age_cap
        self.timeout = timeout
        self.in_use: List[StateSnapshot] = []  # oldest first
        self.taken = 0  # snapshots taken so far
        self._taking: Optional[_Taking] = None  # the snapshot being taken, if any

    @contextlib.asynccontextmanager
    async def use(self) -> AsyncIterator[StateSnapshot]:
        """``async with cache.use() as snapshot:`` a snapshot to stream, released when the block exits."""
        snapshot = await self._acquire()
        try:
            yield snapshot
        finally:
            self._release(snapshot)

    async def _acquire(self) -> StateSnapshot:
        if self._taking is None:
            newest = self.in_use[-1] if self.in_use else None
            if newest is not None and (newest.age <= self.max_age or len(self.in_use) >= self.max_snapshots):
                age = newest.age
                if age > self.age_cap:  # (only when max_snapshots are in use: max_age <= age_cap)
                    raise DonorBusyError(
                        f"this peer already streams {len(self.in_use)} snapshots of its state and the newest was "
                        f"taken {age:.0f} s ago (more than {self.age_cap:g} s): {DONOR_BUSY_HINT}"
                    )
                return self._hold(newest)
            self._taking = _Taking()
            self._taking.task = asyncio.create_task(self._take(self._taking), name="take a state snapshot")
        taking = self._taking
        taking.waiters += 1
        try:
            return await asyncio.shield(taking.task)  # (a waiter that leaves does not cancel it for the others)
        except asyncio.CancelledError:
            task = taking.task
            if task.done() and not task.cancelled() and task.exception() is None:
                self._release(task.result())  # it was ready, with our share counted in: give the share back
            else:
                taking.waiters -= 1  # not ready: we will not be counted in
            raise

    def _hold(self, snapshot: StateSnapshot) -> StateSnapshot:
        if not any(held is snapshot for held in self.in_use):
            self.in_use.append(snapshot)
        snapshot.users += 1
        return snapshot

    def _release(self, snapshot: StateSnapshot) -> None:
        snapshot.users -= 1
        if snapshot.users == 0:
            self.in_use = [held for held in self.in_use if held is not snapshot]

    async def _take(self, taking: _Taking) -> StateSnapshot:
        started = None
        try:
            budget = self._refill_budget()
            if budget < 0:  # recent snapshots spent the budget: downloads arriving meanwhile share the next one
                await asyncio.sleep(min(-budget / self.duty_cycle, MAX_SNAPSHOT_PAUSE))
                if taking.waiters == 0:  # every download that wanted it left meanwhile: take none
                    raise asyncio.CancelledError()
            started = time.monotonic()
            state = await await_with_timeout(self.get_current_state(), self.timeout)
            if not isinstance(state, (tuple, list)) or len(state) not in (2, 3):
                raise TypeError(f"get_current_state must return (metadata, tensors[, infos]), got {state!r:.200}")
            metadata, tensors, infos = state if len(state) == 3 else (*state, None)
            tensors = list(tensors)
            if infos is None:
                infos = [CompressionInfo.from_tensor(tensor, key=index) for index, tensor in enumerate(tensors)]
            infos = list(infos)
            if len(infos) != len(tensors):
                raise ValueError(f"get_current_state returned {len(tensors)} tensors but {len(infos)} infos")
            self.taken += 1
            # every download still waiting for it holds it from now on (each gives its share back when it ends, or
            # at once if it left meanwhile), so that it stays in use until the last of them is done with it
            snapshot = StateSnapshot(metadata, tensors, infos, users=taking.waiters)
            if snapshot.users > 0:  # (else every waiter left: nobody will release it)
                self.in_use.append(snapshot)  # newcomers reuse it at once, before its waiters resume
            return snapshot
        finally:
            if started is not None:  # (a failed attempt cost as much)
                self._refill_budget()
                self._budget -= time.monotonic() - started
            if self._taking is taking:
                self._taking = None

    def _refill_budget(self) -> float:
        now = time.monotonic()
        self._budget = min(self.burst, self._budget + (now - self._budget_at) * self.duty_cycle)
        self._budget_at = now
        return self._budget

    async def shutdown(self) -> None:
        """Cancel a snapshot being taken (its waiters get CancelledError)."""
        if self._taking is not None:
            await cancel_and_wait(self._taking.task)
            self._taking = None  # (a task cancelled before it ran never cleared it)
