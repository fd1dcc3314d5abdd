"""Averaging rounds without a time limit (hivemind.Optimizer(averaging_timeout=None or math.inf)).

Such a round may wait for its group as long as it takes, but not for peers that are gone: a peer killed after the
others counted it on their next round (kill -9, OOM, a lost machine) never joins, and its step would look for a group
forever, holding the optimizer's step with it. A watch thread checks now and then, while the round is still looking
for its group, whether another peer of the run still has a live progress record; once none has (the dead peers'
records expired), it cancels the round, and the optimizer goes on with its local values as after a timeout. A round
whose all-reduce has begun is left alone: its own per-message timeouts bound it.
"""

from __future__ import annotations

import concurrent.futures
import threading
from typing import Callable, Optional

from hivemind.averaging.control import AveragingStage, StepControl
from hivemind.utils.logging import get_logger

logger = get_logger(__name__)

__all__ = ["WATCH_PERIOD", "watch_unlimited_round", "left_alone"]

WATCH_PERIOD = 5.0  # seconds between two checks of a waiting round (each reads the run's progress key once)


def watch_unlimited_round(
    control: StepControl, others_alive: Callable[[], Optional[bool]], running: Callable[[], bool], name: str
) -> None:
    """Cancel ``control`` if it is still looking for its group when ``others_alive()`` says False (nobody else in the
    run). The thread ends with the round, or once ``running()`` is False (the optimizer was shut down)."""
    thread = threading.Thread(target=_watch, args=(control, others_alive, running, name), daemon=True)
    thread.name = f"{name}: watch of a round without a time limit"
    thread.start()


def left_alone(control: StepControl) -> bool:
    """Whether the watch cancelled ``control`` because no other peer of the run was left."""
    return getattr(control, "_no_peers_left", False)


def _watch(control: StepControl, others_alive: Callable[[], Optional[bool]], running: Callable[[], bool], name: str):
    while True:
        try:
            control.result(WATCH_PERIOD)
            return
        except concurrent.futures.TimeoutError:
            pass
        except BaseException:  # failed or cancelled: the round is over
            return
        try:
            if not running():
                return
            if control.stage != AveragingStage.LOOKING_FOR_GROUP or others_alive() is not False:
                continue  # (None: the DHT could not be read this time)
        except Exception as e:  # e.g. the DHT was shut down meanwhile
            logger.debug(f"{name}: the watch of an averaging round stops: {e!r}")
            return
        if control.stage == AveragingStage.LOOKING_FOR_GROUP and not control.done():
            logger.warning(
                f"{name}: no other peer of the run is left (their progress records expired), so the averaging "
                "round that waited for them with no time limit (averaging_timeout=None) is cancelled"
            )
            control._no_peers_left = True
            control.cancel()
        return
