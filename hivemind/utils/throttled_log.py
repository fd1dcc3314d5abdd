"""A log line for an event that a remote peer can cause as often as it likes, written at most once per interval."""

from __future__ import annotations

import logging
import math
import time

__all__ = ["ThrottledLog"]


class ThrottledLog:
    """Logs one kind of event: ``log(message)`` writes at ``level`` at most once per ``interval`` seconds, adding how
    many more came since the last such line, and at DEBUG otherwise (a hostile peer could otherwise flood the log).

    Not thread-safe: use one from a single thread or event loop.
    """

    def __init__(self, logger: logging.Logger, level: int, interval: float):
        self.logger, self.level, self.interval = logger, level, interval
        self.last_logged, self.not_logged = -math.inf, 0  # when a line was last written at ``level``; events since

    def log(self, message: str) -> None:
        now = time.monotonic()
        if now - self.last_logged < self.interval:
            self.not_logged += 1
            self.logger.debug(message, stacklevel=2)
            return
        more = f" ({self.not_logged} more since the last such message)" if self.not_logged else ""
        self.logger.log(self.level, message + more, stacklevel=2)
        self.last_logged, self.not_logged = now, 0
