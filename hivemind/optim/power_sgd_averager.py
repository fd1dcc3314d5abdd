"""PowerSGDGradientAverager: averages low-rank approximations of the gradients (with error feedback) to send less."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from hivemind.averaging.group_info import GroupInfo
from hivemind.averaging.state_snapshot import packed_copy
from hivemind.compression import CompressionInfo, TensorRole
from hivemind.dht import DHT
from hivemind.optim.grad_averager import GradientAverager
from hivemind.optim.optimizer_state import introduces_non_finite
from hivemind.utils.logging import get_logger
from hivemind.utils.math import get_flatten_greedy_dims, orthogonalize_

__all__ = ["PowerSGDGradientAverager"]

logger = get_logger(__name__)

PHASE_P, PHASE_Q = b"PHASE_P", b"PHASE_Q"
_Q_INIT_SEED = 1337  # every peer starts from the same Q, so their products M @ Q can be averaged


class PowerSGDGradientAverager(GradientAverager):
    """
    A GradientAverager that sends, for each gradient viewed as an m x n matrix M, two thin matrices instead of M:
    P = M Q (m x r) is averaged and orthogonalized, then Q = M^T P (n x r) is averaged, and every peer uses P Q^T.
    What the approximation misses stays in a local error-feedback buffer and is added to the next round's gradient.
    Gradients with one dimension, or whose rank-r form would not be at most ``min_compression_ratio`` of their
    size, are averaged as they are (in the first phase). The state shared with newcomers is the Q matrices.

    :param averager_rank: r, the rank of the approximation
    :param min_compression_ratio: compress a gradient only if r * (m + n) <= this * m * n
    :param kwargs: options of :class:`GradientAverager`
    """

    # fmt: off
    def __init__(self, parameters: Iterable[torch.nn.Parameter], averager_rank: int, *, dht: DHT, prefix: str,
                 reuse_grad_buffers: bool = False, accumulate_grads_on: Optional[torch.device] = None,
                 client_mode: Optional[bool] = None, warn: bool = True, min_compression_ratio: float = 0.5,
                 averaged_grads: Optional[Sequence[torch.Tensor]] = None, **kwargs):
        # fmt: on
        if not isinstance(averager_rank, int) or averager_rank < 1:
            raise ValueError(f"averager_rank must be a positive int, got {averager_rank!r}")
        parameters = tuple(parameters)
        self.rank, self.min_compression_ratio = averager_rank, min_compression_ratio
        self._matrix_shapes: Dict[int, Tuple[int, int]] = {}  # parameter index -> (m, n) of compressed gradients
        for index, param in enumerate(parameters):
            shape = get_flatten_greedy_dims(param, max_ndim=2)
            if len(shape) == 2 and averager_rank * sum(shape) <= min_compression_ratio * shape[0] * shape[1]:
                self._matrix_shapes[index] = shape
        with torch.no_grad():
            generator = torch.Generator().manual_seed(_Q_INIT_SEED)
            self._qs = [self._shared_zeros(n, min(m, n, averager_rank)) for m, n in self._matrix_shapes.values()]
            for q in self._qs:
                q.copy_(torch.randn(q.shape, generator=generator))
            self._ps = [self._shared_zeros(m, min(m, n, averager_rank)) for m, n in self._matrix_shapes.values()]
            self._errors = [self._shared_zeros(m, n) for m, n in self._matrix_shapes.values()]
        super().__init__(
            parameters, dht=dht, prefix=prefix, reuse_grad_buffers=reuse_grad_buffers,
            accumulate_grads_on=accumulate_grads_on, client_mode=client_mode, warn=warn,
            averaged_grads=averaged_grads or (), **kwargs,
        )  # fmt: skip

    @staticmethod
    def _shared_zeros(*shape: int) -> torch.Tensor:
        return torch.zeros(shape).share_memory_()

    # ------------------------------------------------------------------ the round (averager's process)

    def _matrix_views(self) -> List[torch.Tensor]:
        return [self._averaged_tensors[i].view(self._matrix_shapes[i]) for i in self._matrix_shapes]

    def _plain_tensors(self) -> List[torch.Tensor]:
        return [tensor for i, tensor in enumerate(self._averaged_tensors) if i not in self._matrix_shapes]

    async def _aggregate_with_group(self, group_info: GroupInfo, weight: float) -> Dict[Any, Any]:
        if not self._matrix_shapes:
            return await super()._aggregate_with_group(group_info, weight)
        loop = asyncio.get_running_loop()
        grads = self._matrix_views()
        plain = self._plain_tensors()
        await loop.run_in_executor(None, self._begin_round, grads)
        try:
            gathered = await self._run_phase(group_info, PHASE_P, [*self._ps, *plain], weight)
            await loop.run_in_executor(None, self._between_phases)
            await self._run_phase(group_info, PHASE_Q, self._qs, weight)
        except BaseException:
            await loop.run_in_executor(None, self._undo_round, grads)
            raise
        await loop.run_in_executor(None, self._finish_round, grads)
        return gathered

    @torch.no_grad()
    def _begin_round(self, grads: List[torch.Tensor]) -> None:
        """M = gradient + error (kept in the error buffer for now); P = M Q."""
        with self.lock_averaged_tensors:
            for grad, error, p, q in zip(grads, self._errors, self._ps, self._qs):
                error.add_(grad)
                torch.matmul(error, q, out=p)

    @torch.no_grad()
    def _between_phases(self) -> None:
        """Orthogonalize the averaged P; Q = M^T P."""
        with self.lock_averaged_tensors:
            for error, p, q in zip(self._errors, self._ps, self._qs):
                orthogonalize_(p)
                torch.matmul(error.t(), p, out=q)

    @torch.no_grad()
    def _finish_round(self, grads: List[torch.Tensor]) -> None:
        """The averaged gradient is P Q^T; what it misses of M stays in the error buffer."""
        with self.lock_averaged_tensors:
            for grad, error, p, q in zip(grads, self._errors, self._ps, self._qs):
                torch.matmul(p, q.t(), out=grad)
                error.sub_(grad)

    @torch.no_grad()
    def _undo_round(self, grads: List[torch.Tensor]) -> None:
        """A failed round leaves the local gradient in place and the error buffer as it was."""
        with self.lock_averaged_tensors:
            for grad, error in zip(grads, self._errors):
                error.sub_(grad)

    async def _run_phase(self, group_info: GroupInfo, suffix: bytes, tensors: List[torch.Tensor], weight: float):
        """One all-reduce of ``tensors`` in the same group, under the group id extended by ``suffix``."""
        phase = GroupInfo(group_info.group_id + suffix, group_info.peer_ids, group_info.gathered)
        with self._averaging(tensors):
            return await super()._aggregate_with_group(phase, weight)

    @contextlib.contextmanager
    def _averaging(self, tensors: List[torch.Tensor]):
        saved = self._averaged_tensors, self.total_size, self.tensor_infos
        self._averaged_tensors = tuple(tensors)
        self.total_size = sum(t.numel() for t in tensors)
        self.tensor_infos = tuple(
            CompressionInfo.from_tensor(t, key=i, role=TensorRole.GRADIENT) for i, t in enumerate(tensors)
        )
        try:
            yield
        finally:
            self._averaged_tensors, self.total_size, self.tensor_infos = saved

    # ------------------------------------------------------------------ state sharing: the Q matrices

    def get_current_state(self):
        with self.lock_averaged_tensors:
            qs = packed_copy(self._qs)
        infos = [CompressionInfo.from_tensor(q, key=i) for i, q in enumerate(qs)]
        return {"group_bits": self.get_group_bits()}, qs, infos

    def load_state_from_peers(self, **kwargs) -> Optional[Tuple[Any, List[torch.Tensor]]]:
        """Download the Q matrices of a peer (None if nobody shares them or they do not fit)."""
        loaded = super().load_state_from_peers(**kwargs)
        if loaded is None:
            return None
        metadata, tensors = loaded
        if len(tensors) != len(self._qs) or any(t.shape != q.shape for t, q in zip(tensors, self._qs)):
            logger.warning("Refused the downloaded PowerSGD state: its Q matrices do not match this model")
            return None
        if any(introduces_non_finite(theirs, q) for theirs, q in zip(tensors, self._qs)):
            logger.warning("Refused the downloaded PowerSGD state: its Q matrices hold inf/NaN")
            return None
        with self.lock_averaged_tensors, torch.no_grad():
            for q, theirs in zip(self._qs, tensors):
                q.copy_(theirs)
        return metadata, tensors
