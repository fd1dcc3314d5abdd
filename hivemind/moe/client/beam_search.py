"""MoEBeamSearcher: finds the best-scoring alive experts of a grid through the prefix entries servers declare.

The search itself runs in the DHT process: it is in hivemind.moe.client.beam_search_dht, which does not import torch.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from functools import partial
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from hivemind.dht import DHT
from hivemind.moe.client.beam_search_dht import (  # (they run in the DHT process: that module is free of torch)
    _get_active_successors,
    _get_initial_beam,
    _search_many,
    beam_search,
    parse_successors,
    top_distinct_experts,
)
from hivemind.moe.client.expert import RemoteExpert, batch_create_remote_experts
from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker
from hivemind.moe.expert_uid import UID_DELIMITER, ExpertPrefix, is_valid_prefix
from hivemind.utils.logging import get_logger

__all__ = ["MoEBeamSearcher", "parse_successors", "beam_search", "top_distinct_experts"]

logger = get_logger(__name__)


class MoEBeamSearcher:
    """Beam search over the experts of one grid that servers announce in the DHT.

    :param uid_prefix: the grid's prefix such as ``ffn.`` (a missing trailing dot is added)
    :param grid_size: the size of each grid dimension
    :param num_workers: concurrent DHT requests of one search (default: the DHT's)
    :param negative_caching: remember a prefix found empty by storing None under its FLAT_EXPERT subkey
    :param cache_expiration: how long (seconds) such a negative entry lives
    """

    def __init__(
        self,
        dht: DHT,
        uid_prefix: str,
        grid_size: Tuple[int, ...],
        num_workers: Optional[int] = None,
        negative_caching: bool = True,
        cache_expiration: float = 300,
        **kwargs,
    ):
        if not uid_prefix.endswith(UID_DELIMITER):
            uid_prefix += UID_DELIMITER
        if not is_valid_prefix(uid_prefix):
            raise ValueError(f"{uid_prefix!r} is not a valid uid prefix (expected e.g. 'ffn.' or 'ffn.3.')")
        if not grid_size or any(int(size) <= 0 for size in grid_size):
            raise ValueError(f"grid_size must be a non-empty sequence of positive sizes, got {grid_size!r}")
        self.dht, self.uid_prefix, self.grid_size = dht, uid_prefix, tuple(int(size) for size in grid_size)
        self.num_workers = num_workers if num_workers is not None else dht.num_workers
        self.negative_caching = negative_caching
        self.cache_expiration = cache_expiration  # seconds
        self.kwargs = kwargs

    def _options(self) -> dict:
        return dict(
            uid_prefix=self.uid_prefix,
            grid_size=self.grid_size,
            negative_caching=self.negative_caching,
            cache_expiration=self.cache_expiration,
            num_workers=self.num_workers,
        )

    def get_initial_beam(self, scores: Sequence[float], beam_size: int, return_future: bool = False):
        """Up to ``beam_size`` (score, prefix, successors) for first-dimension prefixes that have alive experts."""
        scores = [float(score) for score in scores]
        return self.dht.run_coroutine(
            partial(_get_initial_beam, scores=scores, beam_size=beam_size, **self._options()),
            return_future=return_future,
        )

    def get_active_successors(
        self, prefixes: Sequence[ExpertPrefix], grid_size: Optional[int] = None, return_future=False
    ):
        """{prefix: {coordinate: ExpertInfo}} for each prefix (coordinates below ``grid_size`` if given)."""
        for prefix in prefixes:
            assert is_valid_prefix(prefix), f"{prefix!r} is not a valid uid prefix"
        return self.dht.run_coroutine(
            partial(
                _get_active_successors, prefixes=list(prefixes), grid_size=grid_size, num_workers=self.num_workers
            ),
            return_future=return_future,
        )

    def _check_scores(self, grid_scores: Sequence[Sequence[float]]) -> List[List[float]]:
        if len(grid_scores) != len(self.grid_size):
            raise ValueError(f"expected scores for {len(self.grid_size)} grid dimensions, got {len(grid_scores)}")
        checked = []
        for dim, (scores, size) in enumerate(zip(grid_scores, self.grid_size)):
            scores = [float(score) for score in scores]
            if len(scores) != size:
                raise ValueError(f"grid dimension {dim} has size {size}, got {len(scores)} scores")
            checked.append(scores)
        return checked

    def find_best_experts(
        self, grid_scores: Sequence[Sequence[float]], beam_size: int, return_future=False
    ) -> Union[List[RemoteExpert], concurrent.futures.Future]:
        """Up to ``beam_size`` distinct alive experts with the highest total score, best first."""
        infos = self.dht.run_coroutine(
            partial(
                _search_many, batch_scores=[self._check_scores(grid_scores)], beam_size=beam_size, **self._options()
            ),
            return_future=True,
        )
        remote_experts = batch_create_remote_experts(infos, self.dht, return_future=True)
        return RemoteExpertWorker.run_coroutine(_first_sample(remote_experts), return_future=return_future)

    def batch_find_best_experts(
        self, batch_grid_scores: Sequence, beam_size: int, return_future: bool = False
    ) -> Union[List[List[RemoteExpert]], concurrent.futures.Future]:
        """:func:`find_best_experts` for each sample; ``batch_grid_scores[dim]`` is [batch_size, grid_size[dim]]."""
        if len(batch_grid_scores) != len(self.grid_size):
            raise ValueError(f"expected scores for {len(self.grid_size)} dimensions, got {len(batch_grid_scores)}")
        batch_size = len(batch_grid_scores[0])
        columns = []  # per dimension, the scores of each sample as floats (converted at once, not number by number)
        for dim, (dim_scores, size) in enumerate(zip(batch_grid_scores, self.grid_size)):
            if isinstance(dim_scores, torch.Tensor):
                dim_scores = dim_scores.detach().cpu().double()
            try:
                array = np.asarray(dim_scores, dtype=np.float64)
            except (TypeError, ValueError) as e:
                raise ValueError(f"scores of grid dimension {dim} are not a [batch, {size}] array: {e}") from None
            if array.shape != (batch_size, size):
                raise ValueError(
                    f"grid dimension {dim} has size {size}: expected scores of shape [{batch_size}, {size}], got "
                    f"{list(array.shape)}"
                )
            columns.append(array.tolist())
        per_sample = [list(sample_scores) for sample_scores in zip(*columns)]
        infos = self.dht.run_coroutine(
            partial(_search_many, batch_scores=per_sample, beam_size=beam_size, **self._options()),
            return_future=True,
        )
        return batch_create_remote_experts(infos, self.dht, return_future=return_future)


async def _first_sample(future: concurrent.futures.Future):
    return (await asyncio.wrap_future(future))[0]
