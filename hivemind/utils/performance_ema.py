"""An exponential moving average of processing speed (samples per second)."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Optional

__all__ = ["PerformanceEMA"]


class PerformanceEMA:
    """Tracks throughput as an EMA of seconds per sample, with bias correction for the first updates.

    :param alpha: weight of the newest measurement (smoothing factor)
    :param eps: lower bound on seconds per sample, so that speed stays finite
    :param paused: start in the paused state (updates are ignored until :meth:`pause` is left / unpaused)
    """

    def __init__(self, alpha: float = 0.1, eps: float = 1e-20, paused: bool = False):
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        self.alpha, self.eps, self.paused = alpha, eps, paused
        self.num_updates = 0
        self.ema_seconds_per_sample = 0.0
        self.samples_per_second = 1 / max(self.ema_seconds_per_sample, eps)
        self.timestamp = time.perf_counter()
        self.lock = threading.Lock()

    def update(self, task_size: float, interval: Optional[float] = None) -> float:
        """Account for ``task_size`` samples processed in ``interval`` seconds (default: since the previous update
        or :meth:`reset_timer`). Returns the new samples-per-second estimate; ignored while paused."""
        if task_size <= 0:
            raise ValueError(f"task_size must be positive, got {task_size}")
        now = time.perf_counter()
        if interval is None:
            interval = max(0.0, now - self.timestamp)
        elif interval < 0:
            raise ValueError(f"interval must be non-negative, got {interval}")
        self.timestamp = now
        if self.paused:
            return self.samples_per_second
        self.num_updates += 1
        adjusted_alpha = max(self.alpha, 1 / self.num_updates)  # the first update is taken as is
        self.ema_seconds_per_sample = (
            adjusted_alpha * interval / task_size + (1 - adjusted_alpha) * self.ema_seconds_per_sample
        )
        self.samples_per_second = 1 / max(self.ema_seconds_per_sample, self.eps)
        return self.samples_per_second

    def update_threadsafe(self, task_size: float) -> float:
        """Like :meth:`update` with the default interval, safe to call from several threads."""
        with self.lock:
            return self.update(task_size)

    def reset_timer(self) -> None:
        """Start the next interval now (e.g. after idle time that should not count)."""
        self.timestamp = time.perf_counter()

    @contextmanager
    def pause(self):
        """Within this context, updates are ignored; the timer restarts when the context exits."""
        was_paused, self.paused = self.paused, True
        try:
            yield
        finally:
            self.paused = was_paused
            self.reset_timer()

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}(samples_per_second={self.samples_per_second:.3f}, updates={self.num_updates})"
        )
