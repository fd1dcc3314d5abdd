"""hivemind.Optimizer's download of the training state from peers: attempts retried after errors, within a deadline."""

from __future__ import annotations

import time
from typing import Any, Optional

from hivemind.utils.logging import get_logger

__all__ = ["LOAD_STATE_RETRY_DELAY", "load_state_with_retries"]

logger = get_logger(__name__)

LOAD_STATE_RETRY_DELAY = 1.0  # seconds between attempts of Optimizer.load_state_from_peers after an error


def load_state_with_retries(state_averager: Any, deadline: float, run_id: str, **kwargs) -> Optional[Any]:
    """
    ``state_averager.load_state_from_peers(**kwargs)`` until it returns (None: nobody shared a usable state), retried
    after an error until ``deadline`` (``time.monotonic()`` seconds); each attempt gets the time left, at most
    ``kwargs["timeout"]`` if given. An error on the last attempt is logged and gives None.
    """
    user_timeout = kwargs.pop("timeout", None)
    while True:
        remaining = deadline - time.monotonic()
        timeout = remaining if user_timeout is None else min(user_timeout, remaining)
        try:
            return state_averager.load_state_from_peers(timeout=max(timeout, 0.0), **kwargs)
        except Exception as e:
            if time.monotonic() + LOAD_STATE_RETRY_DELAY >= deadline:
                logger.warning(f"{run_id}: could not load the state from peers: {e!r}")
                return None
            logger.warning(f"{run_id}: loading the state from peers failed ({e!r}), retrying")
            time.sleep(LOAD_STATE_RETRY_DELAY)  # an error that comes at once must not spin for minutes
