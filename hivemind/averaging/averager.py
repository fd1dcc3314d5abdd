"""DecentralizedAverager: averages a fixed list of tensors with other peers, from a background process.

The user's process keeps the tensors (in shared memory) and a StepControl per step; the averager's process owns the
event loop, the P2P (replicated from the DHT's daemon), matchmaking, the all-reduce runners and state sharing.
Requests cross a pipe (steps are one-way), step state crosses shared memory, and ``get_current_state`` is called
back in the user's process when a peer downloads the state.
"""

import contextlib
import ctypes
import math
import os
import re
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from hivemind.averaging.allreduce import AveragingMode
from hivemind.averaging.averager_process import AveragerProcess
from hivemind.averaging.control import StepControl
from hivemind.averaging.deadlines import AdaptiveDeadlines
from hivemind.averaging.matchmaking_rules import MAX_GATHER_BYTES
from hivemind.averaging.partition import DEFAULT_PART_SIZE_BYTES
from hivemind.averaging.payload import compute_schema_hash, encode_gather
from hivemind.averaging.shared_buffer import share_in_one_buffer
from hivemind.averaging.state_snapshot import is_describing_state, packed_copy
from hivemind.compression import CompressionBase, CompressionInfo, NoCompression
from hivemind.dht import DHT
from hivemind.dht.dht import check_dht_argument
from hivemind.p2p import PeerID
from hivemind.p2p.call_arguments import MAX_HANDLE_NAME_BYTES
from hivemind.p2p.servicer import get_handle_name
from hivemind.utils.logging import get_logger
from hivemind.utils.mpfuture import MPFuture
from hivemind.utils.process_handle import peek_exitcode
from hivemind.utils.serializer import MSGPackSerializer
from hivemind.utils.timed_storage import get_dht_time
from hivemind.utils.value_checks import is_number

__all__ = ["DecentralizedAverager", "compute_schema_hash", "AveragerArgumentError"]

logger = get_logger(__name__)

GatheredData = Any


class AveragerArgumentError(ValueError, AssertionError):
    """An invalid argument of the averager or of a step (a ValueError; also an AssertionError, as in hivemind 1.1)."""


class DecentralizedAverager(AveragerProcess):
    """
    Averages ``averaged_tensors`` with other peers: each ``step()`` finds a group of peers through the DHT and runs a
    butterfly all-reduce with them. Runs in a background process (started with ``start=True`` or
    ``run_in_background()``), with its own event loop, using the DHT's p2p daemon.

    :param averaged_tensors: the tensors to average, must be leaves (no grad_fn); moved to shared memory in place
      (into one shared buffer where possible, see shared_buffer.py)
    :param dht: a running DHT; the averager uses its daemon
    :param start: start the averager's process now and wait until it is ready
    :param prefix: names this averaging swarm (group keys ``<prefix>.0b<bits>``, handlers ``<prefix>::<class>.*``);
      must not contain dots
    :param target_group_size: start a group as soon as it has this many peers (None: no upper bound)
    :param min_group_size: the smallest group a leader starts when its matchmaking time is up
    :param initial_group_bits: 0/1 string appended to the group key
    :param min_matchmaking_time: seconds spent gathering a group
    :param request_timeout: seconds to wait for a leader's reply (should be below min_matchmaking_time)
    :param averaging_alpha: local tensors move this fraction of the way to the average
    :param part_size_bytes: size of one all-reduce part after compression, bytes
    :param allreduce_timeout: limit of one all-reduce in seconds (None: derived from measured bandwidth; inf: none)
    :param next_chunk_timeout: default for sender_timeout, and the per-message limit of state downloads, seconds
    :param sender_timeout: a sender silent this long is excluded (None: next_chunk_timeout, or derived)
    :param reducer_timeout: a reducer silent this long is treated as failed (None: twice sender_timeout, or derived);
      must exceed sender_timeout
    :param compression: compression of all-reduce parts
    :param state_compression: compression of state downloads
    :param tensor_infos: CompressionInfo per tensor (for adaptive compression)
    :param bandwidth: declared bandwidth for load balancing (0: reduce nothing; None: share equally)
    :param min_vector_size: peers whose share would be smaller than this many elements reduce nothing
    :param auxiliary: help reduce others' tensors without contributing any (incompatible with client mode)
    :param allow_state_sharing: serve this averager's state to newcomers (default: unless client or auxiliary)
    :param declare_state_period: re-announce state sharing this often, seconds
    :param client_mode: accept no incoming connections (default: the DHT's client mode)
    :param daemon: make the averager's process a daemon
    :param shutdown_timeout: seconds to wait for a graceful shutdown before terminating the process (None: as long as
        it takes; the process itself still finishes its clean-up in a few seconds)
    :param start_method: multiprocessing start method of the averager's process (None: the default context's)
    """

    serializer = MSGPackSerializer  # encodes gathered values and the state's metadata for peers (fixed by the wire)

    def __init__(
        self,
        averaged_tensors: Sequence[torch.Tensor],  # leaf tensors, moved to shared memory
        dht: DHT,
        *,
        start: bool,  # start the process now
        prefix: str,  # no dots
        target_group_size: Optional[int] = None,
        min_group_size: int = 2,  # peers
        initial_group_bits: str = "",
        min_matchmaking_time: float = 5.0,  # seconds
        request_timeout: float = 3.0,  # seconds
        averaging_alpha: float = 1.0,
        part_size_bytes: int = DEFAULT_PART_SIZE_BYTES,  # bytes on the wire
        allreduce_timeout: Optional[float] = None,  # seconds (None: derived)
        next_chunk_timeout: Optional[float] = None,  # seconds
        sender_timeout: Optional[float] = None,  # seconds (None: next_chunk_timeout, or derived)
        reducer_timeout: Optional[float] = None,  # seconds (None: twice sender_timeout, or derived)
        compression: CompressionBase = NoCompression(),
        state_compression: CompressionBase = NoCompression(),  # for state downloads
        tensor_infos: Optional[Sequence[CompressionInfo]] = None,
        bandwidth: Optional[float] = None,  # relative to the other peers' (None: equal shares)
        min_vector_size: int = 0,  # elements
        auxiliary: bool = False,
        allow_state_sharing: Optional[bool] = None,  # None: unless client or auxiliary
        declare_state_period: float = 30,
        client_mode: Optional[bool] = None,
        daemon: bool = True,
        shutdown_timeout: Optional[float] = 5,
        start_method: Optional[str] = None,
    ):
        _check(
            isinstance(prefix, str) and prefix and "." not in prefix,
            f"prefix must be a non-empty string without "
            f"dots (it starts the DHT key '<prefix>.0b<bits>'), got {prefix!r}",
        )
        longest_name = max(
            (get_handle_name(prefix, type(self).__name__, handler.name) for handler in self._get_rpc_handlers()),
            key=lambda name: len(name.encode()),
        )
        _check(  # else peers would see each other under the group key, but every call to join a group would fail
            len(longest_name.encode()) <= MAX_HANDLE_NAME_BYTES,
            f"prefix {prefix[:40]!r}... is {len(prefix.encode())} bytes long, too long for the averager's handler "
            f"names (libp2p allows {MAX_HANDLE_NAME_BYTES} bytes, {longest_name.split('::')[-1]!r} with its prefix "
            f"takes {len(longest_name.encode())}): use a shorter prefix",
        )
        check_dht_argument(dht)
        _check(
            isinstance(initial_group_bits, str) and re.fullmatch("[01]*", initial_group_bits),
            f"initial_group_bits must be a string of 0 and 1, got {initial_group_bits!r}",
        )
        _check(
            isinstance(min_group_size, int) and min_group_size >= 1,
            f"min_group_size must be a positive int, got {min_group_size!r}",
        )
        _check(
            target_group_size is None or (isinstance(target_group_size, int) and target_group_size >= min_group_size),
            f"target_group_size must be None or an int >= min_group_size ({min_group_size}), "
            f"got {target_group_size!r}",
        )
        _check(
            is_number(averaging_alpha) and math.isfinite(averaging_alpha),
            f"averaging_alpha must be a finite number, got {averaging_alpha!r}",
        )
        _check(
            isinstance(part_size_bytes, int) and part_size_bytes > 0,
            f"part_size_bytes must be a positive int, got {part_size_bytes!r}",
        )
        _check(
            isinstance(min_vector_size, int) and min_vector_size >= 0,
            f"min_vector_size must be a non-negative int, got {min_vector_size!r}",
        )
        _check(
            is_number(min_matchmaking_time) and math.isfinite(min_matchmaking_time) and min_matchmaking_time >= 0,
            f"min_matchmaking_time must be a finite non-negative number of seconds, got {min_matchmaking_time!r}",
        )
        _check(
            is_number(request_timeout) and math.isfinite(request_timeout) and request_timeout > 0,
            f"request_timeout must be a positive number of seconds, got {request_timeout!r}",
        )
        _check(
            is_number(declare_state_period) and math.isfinite(declare_state_period) and declare_state_period > 0,
            f"declare_state_period must be a positive finite number of seconds, got {declare_state_period!r}",
        )
        if bandwidth is not None and not (
            is_number(bandwidth)
            and math.isfinite(bandwidth)
            and bandwidth >= 0
            and bandwidth <= float(np.finfo(np.float32).max)
        ):
            raise AveragerArgumentError(f"bandwidth must be None or a finite float32 >= 0, got {bandwidth!r}")
        for name, codec in (("compression", compression), ("state_compression", state_compression)):
            _check(
                isinstance(codec, CompressionBase),
                f"{name} must be a compression instance, e.g. Float16Compression(), got {codec!r}",
            )
        if client_mode is None:
            client_mode = dht.client_mode
        _check(
            not (client_mode and auxiliary),
            "an averager cannot be both auxiliary and in client mode: an auxiliary "
            "peer only reduces others' parts, which requires accepting incoming connections",
        )
        if sender_timeout is None:
            sender_timeout = next_chunk_timeout
        self._deadlines = AdaptiveDeadlines(  # also refuses reducer_timeout <= sender_timeout with a ValueError
            sender_timeout=sender_timeout, reducer_timeout=reducer_timeout, allreduce_timeout=allreduce_timeout
        )

        averaged_tensors = tuple(averaged_tensors)
        for index, tensor in enumerate(averaged_tensors):
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"averaged_tensors[{index}] must be a torch.Tensor, got {type(tensor).__name__}")
            if tensor.grad_fn is not None:
                raise AveragerArgumentError(
                    f"averaged_tensors[{index}] has a grad_fn: pass leaf tensors (detach them)"
                )
            if tensor.device.type != "cpu" or tensor.layout != torch.strided:
                # the averager's process reads and writes them in shared memory: every round would fail inside it
                raise AveragerArgumentError(
                    f"averaged_tensors[{index}] is a {tensor.layout} tensor on {tensor.device}, but the averager "
                    "averages dense CPU tensors (moved to shared memory): pass CPU copies, e.g. "
                    "tensor.detach().cpu() (.to_dense() for sparse ones), and copy the averaged values back"
                )
            if any(stride == 0 and size > 1 for stride, size in zip(tensor.stride(), tensor.shape)):
                raise AveragerArgumentError(  # e.g. made by expand(): the average could not be written into it
                    f"averaged_tensors[{index}] has elements that share one memory location (a stride of 0, e.g. "
                    "from expand()): pass tensor.clone()"
                )
            if tensor.dtype == torch.bool:  # the all-reduce has no mean of booleans: every round would fail
                raise AveragerArgumentError(
                    f"averaged_tensors[{index}] is a bool tensor, which cannot be averaged: pass it as uint8 or float"
                )
        if tensor_infos is None:
            tensor_infos = tuple(CompressionInfo.from_tensor(t, key=i) for i, t in enumerate(averaged_tensors))
        tensor_infos = tuple(tensor_infos)
        for index, info in enumerate(tensor_infos):
            if not isinstance(info, CompressionInfo):  # every round reads info.get_part() for each tensor
                raise TypeError(
                    f"tensor_infos[{index}] must be a CompressionInfo, got {type(info).__name__}: pass "
                    f"CompressionInfo.from_tensor(tensor, key=...) for each tensor, or tensor_infos=None"
                )
        _check(
            len(tensor_infos) == len(averaged_tensors),
            f"tensor_infos has {len(tensor_infos)} entries for {len(averaged_tensors)} tensors",
        )
        # in place, as share_memory_() would, but in one shared buffer: one file descriptor for all the tensors
        self._averaged_tensors = tuple(share_in_one_buffer(averaged_tensors))
        self.total_size = sum(tensor.numel() for tensor in self._averaged_tensors)
        self.schema_hash = compute_schema_hash(averaged_tensors)

        if client_mode:
            self.mode = AveragingMode.CLIENT
        elif auxiliary:
            self.mode = AveragingMode.AUX
        else:
            self.mode = AveragingMode.NODE
        self.dht, self.prefix, self.client_mode = dht, prefix, bool(client_mode)
        self.min_group_size, self.target_group_size = min_group_size, target_group_size
        self.initial_group_bits = initial_group_bits
        self.min_matchmaking_time, self._request_timeout = float(min_matchmaking_time), float(request_timeout)
        self.averaging_alpha, self.part_size_bytes = float(averaging_alpha), part_size_bytes
        self.next_chunk_timeout = next_chunk_timeout
        self.compression, self.state_compression, self.tensor_infos = compression, state_compression, tensor_infos
        self.bandwidth = None if bandwidth is None else float(bandwidth)
        self.min_vector_size, self.declare_state_period = min_vector_size, declare_state_period

        super().__init__(daemon=daemon, shutdown_timeout=shutdown_timeout, start_method=start_method)
        self.lock_averaged_tensors = self._context.Lock()
        if allow_state_sharing is None:
            allow_state_sharing = self.mode == AveragingMode.NODE
        self._allow_state_sharing = self._context.Value(ctypes.c_bool, False, lock=False)
        self._state_sharing_priority = self._context.Value(ctypes.c_double, 0.0, lock=False)
        self.allow_state_sharing = allow_state_sharing  # validated by the setter
        if start:
            self.run_in_background(await_ready=True)

    # ------------------------------------------------------------------ properties

    @property
    def peer_id(self) -> PeerID:
        return self.dht.peer_id

    @property
    def request_timeout(self) -> float:
        return self._request_timeout

    @property
    def matchmaking_kwargs(self) -> Dict[str, Any]:
        """The group-forming settings this averager was created with (read by subclasses, e.g. to size a wait by
        ``matchmaking_kwargs["min_matchmaking_time"]``); a new dict, changing it changes nothing."""
        return dict(
            prefix=self.prefix,
            initial_group_bits=self.initial_group_bits,
            target_group_size=self.target_group_size,
            min_group_size=self.min_group_size,
            min_matchmaking_time=self.min_matchmaking_time,
            request_timeout=self.request_timeout,
        )

    @property
    def allreduce_kwargs(self) -> Dict[str, Any]:
        """The all-reduce settings this averager was created with; a timeout of None is derived for each round from
        the rounds measured (see docs/averaging.md). A new dict: changing it changes nothing."""
        return dict(
            compression=self.compression,
            part_size_bytes=self.part_size_bytes,
            min_vector_size=self.min_vector_size,
            sender_timeout=self._deadlines.explicit_sender,
            reducer_timeout=self._deadlines.explicit_reducer,
        )

    @property
    def allow_state_sharing(self) -> bool:
        """Whether this averager serves its state to peers that call ``load_state_from_peers``."""
        return bool(self._allow_state_sharing.value)

    @allow_state_sharing.setter
    def allow_state_sharing(self, value: bool) -> None:
        if value and self.client_mode:
            raise ValueError(
                "a client-mode averager accepts no incoming connections, so it cannot share its state: leave "
                "allow_state_sharing False, or run the DHT without client_mode"
            )
        self._allow_state_sharing.value = bool(value)
        self._notify_state_sharing_changed()

    @property
    def state_sharing_priority(self) -> float:
        """Peers downloading a state prefer donors with a higher priority."""
        return float(self._state_sharing_priority.value)

    @state_sharing_priority.setter
    def state_sharing_priority(self, value: float) -> None:
        if not is_number(value) or not math.isfinite(value):
            raise ValueError(f"state_sharing_priority must be a finite number, got {value!r}")
        if value != 0 and self.client_mode:
            raise ValueError("a client-mode averager cannot share its state, so it cannot have a non-zero priority")
        self._state_sharing_priority.value = float(value)
        self._notify_state_sharing_changed()

    def _notify_state_sharing_changed(self) -> None:
        # (peek: is_alive() would reap an ended process under a shutdown() in another thread, see stop_lock)
        if self._started and os.getpid() == self._origin_pid and peek_exitcode(self) is None:
            self._send_one_way("update_state_sharing")

    # ------------------------------------------------------------------ user API

    def step(
        self,
        gather: GatheredData = None,
        scheduled_time: Optional[float] = None,
        weight: Optional[float] = None,  # None: 1 (0 for auxiliary peers)
        timeout: Optional[float] = None,  # seconds
        allow_retries: bool = True,
        require_trigger: bool = False,
        wait: bool = True,
    ) -> Union[Optional[Dict[PeerID, GatheredData]], StepControl]:
        """
        Average the tensors with a group of peers once.

        :param gather: a msgpack-serializable object sent to every member of the group
        :param scheduled_time: when the all-reduce should start (absolute DHT time; default now + min_matchmaking_time)
        :param weight: this peer's non-negative weight in the average (default 1, 0 for auxiliary peers)
        :param timeout: give up matchmaking and retries after this many seconds (None: keep trying)
        :param allow_retries: retry after a failure until the timeout; False: fail on the first failure
        :param require_trigger: find a group, but start the all-reduce only after ``control.allow_allreduce()``
        :param wait: True: block and return {peer id: gathered object} for the group (raises on failure);
          False: return a StepControl at once
        """
        if weight is not None and self.mode == AveragingMode.AUX:
            logger.warning("An auxiliary averager contributes no tensors: its weight is ignored")
        if weight is None or self.mode == AveragingMode.AUX:
            weight = 0.0 if self.mode == AveragingMode.AUX else 1.0
        if not (is_number(weight) and math.isfinite(weight) and weight >= 0):
            raise AveragerArgumentError(f"weight must be a finite non-negative number, got {weight!r}")
        if require_trigger and wait:
            raise AveragerArgumentError(
                "require_trigger=True needs wait=False: the step waits for control.allow_allreduce(), which cannot "
                "be called while step() blocks"
            )
        now = get_dht_time()
        if scheduled_time is None:
            scheduled_time = now + self.min_matchmaking_time
        if is_number(timeout) and timeout == math.inf:  # no limit, as None (hivemind.Optimizer passes its own)
            timeout = None
        for name, value in (("scheduled_time", scheduled_time), ("timeout", timeout)):
            if value is not None and not (is_number(value) and math.isfinite(value)):
                raise AveragerArgumentError(f"{name} must be a finite number of seconds or None, got {value!r}")
        deadline = None if timeout is None else now + timeout
        if deadline is not None and scheduled_time >= deadline:
            raise AveragerArgumentError(
                f"the all-reduce is scheduled {scheduled_time - now:.2f} s from now, which is not before the "
                f"timeout ({timeout} s): pass a larger timeout or an earlier scheduled_time"
            )
        data_for_gather = encode_gather(self.bandwidth, self.mode.value, gather)
        if len(data_for_gather) > MAX_GATHER_BYTES:
            raise AveragerArgumentError(
                f"gather is {len(data_for_gather)} bytes once encoded, peers accept at most {MAX_GATHER_BYTES}: "
                "send less (e.g. a summary) or share large data through the DHT"
            )
        control = StepControl(scheduled_time, deadline, allow_retries, weight, data_for_gather)
        if not require_trigger:
            control.allow_allreduce()
        self._send_step(control)
        return control.result() if wait else control

    @contextlib.contextmanager
    def get_tensors(self):
        """Hold the averager's lock and give the averaged tensors; do not keep references after exiting."""
        with self.lock_averaged_tensors:
            yield self._averaged_tensors

    def get_current_state(self) -> Tuple[Any, Sequence[torch.Tensor], Sequence[CompressionInfo]]:
        """The state sent to peers that download it: (metadata, tensors, infos). Runs in the user's process;
        override it to share something else (the tensors must then not change while being sent: return copies)."""
        if is_describing_state():  # only shapes and dtypes (ours never change): no copy, and no lock, which the
            tensors = packed_copy(self._averaged_tensors)  # caller of load_state_from_peers() may hold
        else:
            with self.get_tensors() as tensors:
                tensors = packed_copy(tensors)  # one copy, in shared memory: it reaches the averager's process as is
        metadata = {"group_key": self.get_group_bits()}
        return metadata, tensors, self.tensor_infos

    def load_state_from_peers(
        self,
        wait: bool = True,
        timeout: Optional[float] = None,
    ) -> Union[Optional[Tuple[Any, Sequence[torch.Tensor]]], MPFuture]:
        """Download the state of the best peer that shares it: (metadata, tensors), or None if nobody does."""
        _check_load_timeout(timeout)
        future = self._call_future("load_state_from_peers", timeout)
        return future.result() if wait else future

    def _load_state_from_peers_excluding(
        self, exclude: Sequence[PeerID], timeout: Optional[float] = None, optional_tail: int = 0
    ) -> Optional[Tuple[Any, Sequence[torch.Tensor], PeerID]]:
        """As load_state_from_peers, without asking the donors in ``exclude``, and saying whose state it is:
        (metadata, tensors, donor), or None. For subclasses that check a state and try the next donor if it is
        refused. A state may lack the last ``optional_tail`` tensors of get_current_state()'s (all or none of them:
        e.g. optimizer statistics that the donor has not made yet)."""
        _check_load_timeout(timeout)
        return self._call_future("load_state_excluding", timeout, tuple(exclude), int(optional_tail)).result()

    def get_group_bits(self, wait: bool = True) -> Union[str, MPFuture]:
        future = self._call_future("get_group_bits")
        return future.result() if wait else future

    def set_group_bits(self, group_bits: str, wait: bool = True) -> Union[None, MPFuture]:
        if not (isinstance(group_bits, str) and re.fullmatch("[01]*", group_bits)):
            raise AveragerArgumentError(f"group_bits must be a string of 0 and 1, got {group_bits!r}")
        future = self._call_future("set_group_bits", group_bits)
        return future.result() if wait else future

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.prefix!r}, mode={self.mode.name}, tensors={len(self._averaged_tensors)})"


def _check_load_timeout(timeout: Any) -> None:
    if timeout is not None:
        if not is_number(timeout):
            raise TypeError(f"timeout must be None or a non-negative number of seconds, got {timeout!r}")
        if not timeout >= 0:  # (NaN too)
            raise AveragerArgumentError(f"timeout must be None or a non-negative number of seconds, got {timeout}")


def _check(condition: Any, message: str) -> None:
    if not condition:
        raise AveragerArgumentError(message)
