"""A tqdm bar of the samples the swarm accumulated toward the next epoch, with the peers taking part and the ETA."""

from __future__ import annotations

import math
from typing import Optional

from hivemind.optim.epoch_rule import GlobalTrainingProgress
from hivemind.utils.timed_storage import get_dht_time

__all__ = ["EpochProgressBar"]


class EpochProgressBar:
    """Shows ``samples/target [epoch N, P peers, ETA s]``; does nothing when disabled (``verbose=False``)."""

    def __init__(self, run_id: str, enabled: bool):
        self.run_id, self.enabled = run_id, enabled
        self._bar = None
        self._epoch: Optional[int] = None

    def update(self, progress: GlobalTrainingProgress, local_epoch: int) -> None:
        if not self.enabled:
            return
        if self._bar is None or self._epoch != local_epoch:
            self.close()
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=progress.target_batch_size,
                desc=f"{self.run_id} epoch {local_epoch}",
                unit="samples",
                unit_scale=True,  # the rate as "2.76Msamples/s"; the counts stay exact (bar_format below)
                bar_format="{l_bar}{bar}| {n}/{total} [{elapsed}<{remaining}, {rate_fmt}{postfix}]",
                leave=False,
            )
            self._epoch = local_epoch
        eta = max(progress.eta_next_epoch - get_dht_time(), 0.0)  # an overdue epoch is due now, not in -3 s
        self._bar.n = min(progress.samples_accumulated, progress.target_batch_size)
        self._bar.set_postfix(
            peers=progress.num_peers, eta=f"{eta:.1f}s" if math.isfinite(eta) else "?", refresh=False
        )
        self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
