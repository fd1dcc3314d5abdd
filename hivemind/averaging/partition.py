"""The two halves of a butterfly all-reduce without the network: cutting local tensors into parts and collecting the
averaged results (``TensorPartContainer``), and averaging the parts that one peer reduces (``TensorPartReducer``).

Every group member computes the same cut from the same inputs: the tensors are flattened and concatenated, each peer
owns a contiguous element range (sizes from the load balancer), and each tensor is cut into parts of a fixed number of
elements; a part belongs to the peer whose range covers most of it.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from hivemind.averaging.load_balancing import hagenbach_bishoff
from hivemind.averaging.output_buffers import ReusableOutputs
from hivemind.averaging.part_math import (
    accumulator_dtype,
    add_into,
    add_offsets_,
    add_scaled_,
    copy_into,
    delta_dtype,
    div_,
    is_integer_dtype,
    rounded_average,
    scale_into,
    zero_,
)
from hivemind.averaging.partition_plan import PartSpec, part_size_elements, plan_parts
from hivemind.compression import CompressionBase, CompressionInfo, Float16Compression, NoCompression
from hivemind.compression.adaptive import AdaptiveCompressionBase
from hivemind.compression.base import FloatingOnlyCodec
from hivemind.compression.buffers import empty_output
from hivemind.proto import runtime_pb2
from hivemind.utils.logging import get_logger

__all__ = [
    "DEFAULT_PART_SIZE_BYTES",
    "AllreduceException",
    "BannedException",
    "PartSpec",
    "plan_parts",
    "part_size_elements",
    "RAW_DTYPES",
    "TensorPartContainer",
    "TensorPartReducer",
]

logger = get_logger(__name__)

DEFAULT_PART_SIZE_BYTES = 2**19  # target size of one part on the wire (after compression)
DEFAULT_PREFETCH = 5  # parts compressed ahead of the stream that sends them
DEFAULT_REDUCE_WINDOW = 4  # a reducer accumulates up to this many parts ahead of the oldest unfinished one


# dtypes whose NONE-compressed wire bytes are exactly their memory (bfloat16 travels as float32 by default, bool is
# normalized to 0/1 by the codec)
RAW_DTYPES = (torch.float32, torch.float64, torch.float16, torch.int64, torch.int32, torch.int16, torch.int8)


class AllreduceException(Exception):
    """An all-reduce could not complete as planned: a peer failed, timed out or sent malformed data."""


class BannedException(AllreduceException):
    """A sender was excluded from this all-reduce; the reducer no longer accepts its parts."""


def _resolve_codec(compression: CompressionBase, info: CompressionInfo) -> CompressionBase:
    while isinstance(compression, AdaptiveCompressionBase):
        compression = compression.choose_compression(info)
    dtype = info.descriptor.dtype or torch.float32
    if isinstance(compression, FloatingOnlyCodec) and not dtype.is_floating_point:
        return NoCompression()  # (lossy codecs refuse other dtypes): such parts travel uncompressed, exactly
    if isinstance(compression, Float16Compression) and dtype == torch.bfloat16:
        return NoCompression()  # (the 16-bit codecs refuse bfloat16, already 16 bits): uncompressed, exactly
    return compression


def is_cheap_codec(codec: CompressionBase) -> bool:
    """Codecs that cost about one memory copy per part: run inline instead of in a thread."""
    return type(codec) in (NoCompression, Float16Compression)


class TensorPartContainer:
    """Local tensors cut into parts for each reducer, and the averaged deltas assembled back into tensors.

    :param tensors: local CPU tensors (read, never modified)
    :param peer_fractions: one non-negative share per group member; element counts are derived from them with
        :func:`hagenbach_bishoff` (passing the counts of ``load_balance_peers`` reproduces them exactly)
    :param compression: codec (or adaptive strategy) for the parts this peer sends
    :param part_size_bytes: target size of one compressed part
    :param tensor_infos: CompressionInfo per tensor (default: from the tensor, key = its index)
    :param prefetch: parts compressed ahead of sending, per reducer
    :param output_buffers: where the outputs' memory comes from (reused across rounds; default: fresh memory)
    """

    def __init__(
        self,
        tensors: Sequence[torch.Tensor],
        peer_fractions: Sequence[float],
        compression: Optional[CompressionBase] = None,
        part_size_bytes: int = DEFAULT_PART_SIZE_BYTES,  # after compression
        tensor_infos: Optional[Sequence[CompressionInfo]] = None,
        prefetch: int = DEFAULT_PREFETCH,
        output_buffers: Optional[ReusableOutputs] = None,
    ):
        if tensor_infos is None:
            tensor_infos = [CompressionInfo.from_tensor(tensor, key=i) for i, tensor in enumerate(tensors)]
        if len(tensor_infos) != len(tensors):
            raise ValueError(f"got {len(tensor_infos)} tensor_infos for {len(tensors)} tensors")
        for tensor in tensors:
            if tensor.device.type != "cpu":
                raise ValueError(f"all-reduce averages CPU tensors, got one on {tensor.device}")
        self.local_tensors = list(tensors)
        self.tensor_infos = list(tensor_infos)
        self.compression = compression if compression is not None else NoCompression()
        self.prefetch = max(1, prefetch)
        self.output_buffers = output_buffers
        self.group_size = len(peer_fractions)
        # flat views of the inputs; a non-contiguous tensor is copied once, here (reshape alone may give a strided
        # view, e.g. of a matrix's column, whose parts could not be sent from their memory)
        self._flat = [tensor.detach().reshape(-1).contiguous() for tensor in self.local_tensors]
        self.total_size = sum(flat.numel() for flat in self._flat)
        self.peer_element_counts = tuple(hagenbach_bishoff(self.total_size, peer_fractions))
        part_sizes = [
            part_size_elements(part_size_bytes, flat.element_size(), self.compression.estimate_compression_ratio(info))
            for flat, info in zip(self._flat, self.tensor_infos)
        ]
        self.part_sizes = part_sizes
        self.parts = plan_parts([flat.numel() for flat in self._flat], part_sizes, self.peer_element_counts)
        self.parts_by_peer: List[List[PartSpec]] = [[] for _ in range(self.group_size)]
        for part in self.parts:
            self.parts_by_peer[part.reducer].append(part)
        self.num_parts_by_peer = tuple(len(parts) for parts in self.parts_by_peer)

        self._outputs: List[Optional[torch.Tensor]] = [None] * len(self._flat)
        self._parts_left = [0] * len(self._flat)
        for part in self.parts:
            self._parts_left[part.tensor_index] += 1
        self._part_done = bytearray(len(self.parts))
        self._tensor_ready = [asyncio.Event() for _ in self._flat]
        for tensor_index, left in enumerate(self._parts_left):
            if left == 0:
                self._tensor_ready[tensor_index].set()
        self._failure: Optional[BaseException] = None
        self._next_output = 0

    # ------------------------------------------------------------------ sending side

    def part_info(self, part: PartSpec) -> CompressionInfo:
        return self.tensor_infos[part.tensor_index].get_part(part.part_index, self.part_sizes[part.tensor_index])

    def input_part(self, part: PartSpec) -> torch.Tensor:
        """The local values of a part (a read-only view of the caller's tensor)."""
        return self._flat[part.tensor_index][part.start : part.stop]

    def compress_part(self, part: PartSpec) -> runtime_pb2.Tensor:
        info = self.part_info(part)
        return _resolve_codec(self.compression, info).compress(self.input_part(part), info)

    def part_nbytes(self, reducer_index: int, index: int) -> int:
        """Bytes of local values in part ``index`` of reducer ``reducer_index`` (before compression)."""
        part = self.parts_by_peer[reducer_index][index]
        return part.numel * self._flat[part.tensor_index].element_size()

    def raw_input_part(self, part: PartSpec) -> Optional[torch.Tensor]:
        """The part's local values if it goes on the wire uncompressed as its raw memory (else None)."""
        flat = self._flat[part.tensor_index]
        if (
            flat.dtype not in RAW_DTYPES
            or type(_resolve_codec(self.compression, self.part_info(part))) is not NoCompression
        ):
            return None
        return flat[part.start : part.stop]

    async def iterate_parts_for_sending(
        self, reducer_index: int
    ) -> AsyncIterator[Union[torch.Tensor, runtime_pb2.Tensor]]:
        """Like :meth:`iterate_input_parts_for`, but a part that goes on the wire uncompressed comes as a tensor (a
        view, no copy). Decided part by part: one reducer's parts may span tensors of different dtypes or codecs."""
        async for part in self._iterate_parts(reducer_index, allow_raw=True):
            yield part

    async def iterate_input_parts_for(self, reducer_index: int) -> AsyncIterator[runtime_pb2.Tensor]:
        """The compressed parts that ``reducer_index`` reduces, in order; costly codecs run in a thread, ahead."""
        async for part in self._iterate_parts(reducer_index, allow_raw=False):
            yield part

    async def _iterate_parts(
        self, reducer_index: int, allow_raw: bool
    ) -> AsyncIterator[Union[torch.Tensor, runtime_pb2.Tensor]]:
        parts = self.parts_by_peer[reducer_index]
        raw = [self.raw_input_part(part) if allow_raw else None for part in parts]
        costly = [
            k
            for k, part in enumerate(parts)
            if raw[k] is None and not is_cheap_codec(_resolve_codec(self.compression, self.part_info(part)))
        ]
        loop = asyncio.get_running_loop()
        ahead: Dict[int, asyncio.Future] = {}  # costly parts being compressed in threads, by position
        next_costly = 0
        try:
            for k, part in enumerate(parts):
                while next_costly < len(costly) and len(ahead) < self.prefetch:
                    index = costly[next_costly]
                    ahead[index] = loop.run_in_executor(None, self.compress_part, parts[index])
                    next_costly += 1
                if raw[k] is not None:
                    yield raw[k]
                elif k in ahead:
                    yield await ahead.pop(k)
                else:
                    yield self.compress_part(part)
        finally:
            for future in ahead.values():
                future.cancel()

    # ------------------------------------------------------------------ receiving side

    def _output(self, tensor_index: int) -> torch.Tensor:
        output = self._outputs[tensor_index]
        if output is None:
            flat = self._flat[tensor_index]
            if self.output_buffers is None:
                output = empty_output(flat.numel(), delta_dtype(flat.dtype))
            else:
                output = self.output_buffers.take(tensor_index, flat.numel(), delta_dtype(flat.dtype))
            self._outputs[tensor_index] = output
        return output

    def output_part(self, part: PartSpec) -> torch.Tensor:
        """Where the delta of a part goes (write it, then call :meth:`mark_part_done`)."""
        return self._output(part.tensor_index)[part.start : part.stop]

    def is_part_done(self, part: PartSpec) -> bool:
        return bool(self._part_done[part.global_index])

    def mark_part_done(self, part: PartSpec) -> None:
        if self._part_done[part.global_index]:
            raise ValueError(f"part {part} was already processed")
        self._part_done[part.global_index] = 1
        self._parts_left[part.tensor_index] -= 1
        if self._parts_left[part.tensor_index] == 0:
            self._tensor_ready[part.tensor_index].set()

    def register_processed_part(
        self,
        peer_index: int,
        part_index: int,
        delta: torch.Tensor,
        check: Optional[Callable[[torch.Tensor], None]] = None,
    ) -> None:
        """Store the averaged delta of part ``part_index`` of reducer ``peer_index`` (a tensor of the part's size).

        :param check: called with the stored copy before the part counts as done; if it raises, the part stays
            not done (:meth:`register_failed_reducer` then gives it its local values)
        """
        part = self.parts_by_peer[peer_index][part_index]
        if delta.numel() != part.numel:
            raise AllreduceException(f"delta for {part} has {delta.numel()} elements, expected {part.numel}")
        output = self.output_part(part)
        copy_into(output, delta.reshape(-1))
        if check is not None:
            check(output)
        self.mark_part_done(part)

    def register_failed_reducer(self, peer_index: int) -> int:
        """The parts of a failed reducer that have no delta yet keep their local values (zero delta).

        Returns how many parts were affected."""
        failed = 0
        for part in self.parts_by_peer[peer_index]:
            if not self._part_done[part.global_index]:
                zero_(self.output_part(part))
                self.mark_part_done(part)
                failed += 1
        return failed

    def fail(self, exception: BaseException) -> None:
        """Make :meth:`iterate_output_tensors` raise ``exception`` instead of waiting for more parts."""
        self._failure = exception
        for event in self._tensor_ready:
            event.set()

    async def iterate_output_tensors(self) -> AsyncIterator[torch.Tensor]:
        """Deltas (averaged - local) per tensor, in order, each as soon as all its parts are in."""
        while self._next_output < len(self._flat):
            tensor_index = self._next_output
            await self._tensor_ready[tensor_index].wait()
            if self._failure is not None:
                raise self._failure
            self._next_output += 1
            flat = self._flat[tensor_index]
            output = self._outputs[tensor_index] if flat.numel() > 0 else torch.zeros_like(flat)
            self._outputs[tensor_index] = None  # the consumer owns it now
            yield output.view(self.local_tensors[tensor_index].shape)

    def finished_parts(self) -> int:
        return sum(self._part_done)


class TensorPartReducer:
    """Averages, strictly in order, the parts that one peer reduces, over the senders that are still active.

    Each sender submits its parts in order with its weight. Part ``k`` is released (its average computed) once every
    active sender delivered it; a banned sender is excluded from the parts it had not delivered yet, while parts it
    delivered keep its contribution. Up to ``window`` parts are accumulated ahead of the oldest unreleased one; a
    faster sender waits beyond that.

    :param part_shapes: shape of each part this peer reduces
    :param num_senders: number of senders (indices ``0 .. num_senders - 1``)
    :param part_dtypes: dtype of each part (default float32)
    """

    def __init__(
        self,
        part_shapes: Sequence[Tuple[int, ...]],
        num_senders: int,
        *,
        part_dtypes: Optional[Sequence[torch.dtype]] = None,
        window: int = DEFAULT_REDUCE_WINDOW,
    ):
        self.part_shapes = [torch.Size(shape) for shape in part_shapes]
        self.part_numels = [shape.numel() for shape in self.part_shapes]
        self.part_dtypes = list(part_dtypes) if part_dtypes is not None else [torch.float32] * len(self.part_shapes)
        if len(self.part_dtypes) != len(self.part_shapes):
            raise ValueError(f"got {len(self.part_dtypes)} part dtypes for {len(self.part_shapes)} parts")
        self.num_parts, self.num_senders, self.window = len(self.part_shapes), num_senders, max(1, window)
        self.sender_progress = [0] * num_senders  # parts delivered by each sender
        self.active_senders = [True] * num_senders
        self.banned_reasons: Dict[int, str] = {}
        self.current_part_index = 0  # every part before this one is released
        self._accumulators: Dict[int, Tuple[torch.Tensor, float, bool]] = {}  # (sum, weights, owned)
        self._integer_bases: Dict[int, torch.Tensor] = {}  # integer parts: the first part, which sums are offsets to
        self._results: Dict[int, asyncio.Future] = {}
        self._progress = asyncio.Event()  # set (and replaced) whenever parts are released or senders banned
        self.finished = asyncio.Event()
        self._failure: Optional[BaseException] = None
        if self.num_parts == 0 or num_senders == 0:
            self._release_ready_parts()

    @property
    def num_current_senders(self) -> int:
        return sum(self.active_senders)

    def is_active(self, sender_index: int) -> bool:
        return self.active_senders[sender_index]

    async def accumulate_part(
        self,
        sender_index: int,
        part_index: int,
        tensor_part: torch.Tensor,
        weight: float = 1.0,
    ) -> Optional[torch.Tensor]:
        """Add one part and wait for its average (None if no sender with a non-zero weight delivered it)."""
        return await (await self.submit_part(sender_index, part_index, tensor_part, weight))

    async def submit_part(
        self,
        sender_index: int,
        part_index: int,
        tensor_part: torch.Tensor,
        weight: float = 1.0,
    ) -> asyncio.Future:
        """Add one part; returns a future of its average (see :meth:`accumulate_part`).

        :raises BannedException: the sender is (or gets, while waiting for the window) banned
        :raises AllreduceException: the part is out of order, of the wrong size or dtype (the sender is banned)
        """
        self._check_sender(sender_index)
        expected = self.sender_progress[sender_index]
        if part_index != expected or part_index >= self.num_parts:
            reason = f"sent part {part_index}, expected part {expected} of {self.num_parts}"
            self.ban_sender(sender_index, reason)
            raise AllreduceException(f"sender {sender_index} {reason}")
        if tensor_part.numel() != self.part_numels[part_index] or tensor_part.dtype != self.part_dtypes[part_index]:
            reason = (
                f"sent part {part_index} with {tensor_part.numel()} elements of {tensor_part.dtype}, expected "
                f"{self.part_numels[part_index]} of {self.part_dtypes[part_index]}"
            )
            self.ban_sender(sender_index, reason)
            raise AllreduceException(f"sender {sender_index} {reason}")
        while part_index >= self.current_part_index + self.window:
            progress = self._progress
            await progress.wait()
            self._check_sender(sender_index)
        result = self._result_future(part_index)
        self._accumulate(part_index, tensor_part.reshape(-1), float(weight))
        self.sender_progress[sender_index] += 1
        self._release_ready_parts()
        return result

    def _check_sender(self, sender_index: int) -> None:
        if self._failure is not None:
            raise self._failure
        if not 0 <= sender_index < self.num_senders:
            raise AllreduceException(f"unknown sender index {sender_index}")
        if not self.active_senders[sender_index]:
            raise BannedException(
                f"sender {sender_index} was banned: {self.banned_reasons.get(sender_index, 'unknown reason')}"
            )

    def _result_future(self, part_index: int) -> asyncio.Future:
        future = self._results.get(part_index)
        if future is None:
            future = self._results[part_index] = asyncio.get_running_loop().create_future()
        return future

    def _accumulate(self, part_index: int, part: torch.Tensor, weight: float) -> None:
        """Add ``weight * part`` to the part's sum (weight 0: nothing, not even the int64 offsets' base). The first
        contribution is only referenced (no copy): alone, it is its own average; the second makes the sum at once."""
        if weight == 0.0:
            return
        entry = self._accumulators.get(part_index)
        if entry is None:
            self._accumulators[part_index] = (part, weight, False)
            return
        accumulator, denominator, owned = entry
        base = self._integer_bases.get(part_index)
        if not owned and is_integer_dtype(part.dtype):  # sums of differences from the first part: exact in int64
            base = self._integer_bases[part_index] = accumulator.to(torch.int64, copy=True)
            accumulator = torch.zeros(part.numel(), dtype=torch.float64)
        elif not owned:
            first, first_weight = accumulator, denominator
            accumulator = torch.empty(part.numel(), dtype=accumulator_dtype(part.dtype))
            if first_weight == 1.0 and weight == 1.0:
                add_into(accumulator, first, part)
                self._accumulators[part_index] = (accumulator, 2.0, True)
                return
            if first_weight == 0.0:
                zero_(accumulator)
            else:
                scale_into(accumulator, first, first_weight)
        if base is None or not add_offsets_(accumulator, part, base, weight, denominator):
            self._integer_bases.pop(part_index, None)  # (integers too far apart for int64 offsets: sums of values)
            if weight == 1.0:
                add_scaled_(accumulator, part)
            elif weight != 0.0:
                add_scaled_(accumulator, part, weight)
        self._accumulators[part_index] = (accumulator, denominator + weight, True)

    def _release_ready_parts(self) -> None:
        active_progress = [progress for progress, active in zip(self.sender_progress, self.active_senders) if active]
        ready_until = min(active_progress) if active_progress else self.num_parts
        released = False
        while self.current_part_index < min(ready_until, self.num_parts):
            part_index = self.current_part_index
            accumulator, denominator, owned = self._accumulators.pop(part_index, (None, 0.0, False))
            base = self._integer_bases.pop(part_index, None)
            if accumulator is None or denominator <= 0:
                average = None  # nobody with a non-zero weight delivered it: every sender keeps its values
            elif base is not None:  # integers: the rounded average itself (int64)
                average = rounded_average(base, accumulator, denominator)
            else:
                average = div_(accumulator, denominator) if owned else accumulator  # read-only for the callers
            future = self._results.pop(part_index, None)
            if future is not None and not future.done():
                future.set_result(average)
            self.current_part_index += 1
            released = True
        if released or not active_progress:
            self._notify()
        if self.current_part_index >= self.num_parts:
            self.finished.set()

    def _notify(self) -> None:
        self._progress.set()
        self._progress = asyncio.Event()

    def ban_sender(self, sender_index: int, reason: str = "") -> bool:
        """Exclude a sender from every part it has not delivered yet; returns False if it was already banned."""
        if not self.active_senders[sender_index]:
            return False
        self.active_senders[sender_index] = False
        self.banned_reasons[sender_index] = reason or "no reason given"
        self._release_ready_parts()
        self._notify()
        return True

    on_sender_failed = ban_sender

    def finalize(self, exception: Optional[BaseException] = None) -> None:
        """Stop: waiting submitters and result futures get ``exception`` (default: an AllreduceException)."""
        if self._failure is None:
            self._failure = exception or AllreduceException("the reducer was finalized before all parts were averaged")
        for future in self._results.values():
            if not future.done():
                future.set_exception(self._failure)
                future.exception()  # retrieved here: nobody may be waiting for it any more
        self._results.clear()
        self._accumulators.clear()
        self._integer_bases.clear()
        self._notify()
        self.finished.set()
