"""StepControl: the handle of one averaging step, shared between the user's process and the averager's process."""

from __future__ import annotations

import math
from enum import Enum
from typing import Any, Optional

from hivemind.utils.logging import get_logger
from hivemind.utils.mpfuture import MPFuture
from hivemind.utils.shared_slots import SharedSlot
from hivemind.utils.timed_storage import DHTExpiration, get_dht_time

__all__ = ["AveragingStage", "StepControl"]

logger = get_logger(__name__)

# cells of the future's shared slot (see MPFuture): every process holding the control sees the same values
_SCHEDULED_TIME, _WEIGHT, _TRIGGER, _STAGE, _BEGAN_ALLREDUCE, _EXPECTED_GROUP_SIZE = range(6)


class AveragingStage(Enum):
    IDLE = 0  # the step was created but the averager has not picked it up yet
    LOOKING_FOR_GROUP = 1
    AWAITING_TRIGGER = 2  # a group was found, the all-reduce waits for allow_allreduce()
    RUNNING_ALLREDUCE = 3
    FINISHED = 4


class StepControl(MPFuture):
    """
    One averaging step requested with ``averager.step(wait=False)``. Its result is the dict of gathered objects
    (peer id -> what that peer passed as ``gather``); its exception says why the step failed.

    The scheduled time, the weight, the trigger and the stage live in shared memory: setting them in the user's
    process takes effect in the averager's process at once, with no message sent.

    :param scheduled_time: when the all-reduce should start (absolute DHT time, seconds)
    :param deadline: give up matchmaking and retries after this time (absolute DHT time, seconds), None = never
    :param allow_retries: retry after a failed matchmaking or all-reduce until the deadline
    :param weight: this peer's non-negative weight in the weighted average
    :param data_for_gather: the encoded gather payload this peer sends to its group
    """

    def __init__(
        self,
        scheduled_time: DHTExpiration,
        deadline: Optional[float],
        allow_retries: bool,
        weight: float,
        data_for_gather: bytes,
    ):
        super().__init__()
        if self._shared is None:
            raise RuntimeError("StepControl needs shared memory for its state, and none could be allocated")
        self._data_for_gather = data_for_gather
        self._deadline, self._allow_retries = deadline, allow_retries
        self.scheduled_time = scheduled_time
        self.weight = weight
        self.stage = AveragingStage.IDLE

    def _extra_pickle_state(self) -> Any:
        return self._data_for_gather, self._deadline, self._allow_retries

    def _restore_extra_state(self, state: Any) -> None:
        self._data_for_gather, self._deadline, self._allow_retries = state

    @property
    def _slot(self) -> SharedSlot:
        if self._shared is None:  # a copy unpickled once the process that made the step had exited
            raise RuntimeError(
                f"the shared state of this step is gone: the process that made it (pid {self._origin_pid}) has exited"
            )
        return self._shared

    # ------------------------------------------------------------------ trigger

    def allow_allreduce(self) -> None:
        """Let the all-reduce begin (for steps made with ``require_trigger=True``); it is fine to call it early."""
        if self.done():
            logger.warning(f"allow_allreduce() was called on a step that is already over: {self!r}")
        self._slot.set_int(_TRIGGER, 1)

    @property
    def triggered(self) -> bool:
        return self._slot.get_int(_TRIGGER) == 1

    # ------------------------------------------------------------------ shared fields

    @property
    def scheduled_time(self) -> DHTExpiration:
        return self._slot.get_float(_SCHEDULED_TIME)

    @scheduled_time.setter
    def scheduled_time(self, scheduled_time: DHTExpiration) -> None:
        scheduled_time = float(scheduled_time)
        if not math.isfinite(scheduled_time):  # NaN or inf: the search could never declare a usable expiration
            raise ValueError(f"scheduled_time must be a finite DHT time in seconds, got {scheduled_time}")
        if self.began_allreduce:
            logger.warning("Changing the scheduled time has no effect: the all-reduce has already begun")
        if self._deadline is not None and scheduled_time > self._deadline:
            logger.warning(
                f"The scheduled time ({scheduled_time:.3f}) is after the step's deadline ({self._deadline:.3f}): "
                "the step will time out before it"
            )
        self._slot.set_float(_SCHEDULED_TIME, scheduled_time)

    @property
    def weight(self) -> float:
        return self._slot.get_float(_WEIGHT)

    @weight.setter
    def weight(self, weight: float) -> None:
        weight = float(weight)
        if not (math.isfinite(weight) and weight >= 0):
            raise ValueError(f"weight must be a finite non-negative number, got {weight}")
        if self.began_allreduce:
            logger.warning("Changing the weight has no effect: the all-reduce has already begun")
        self._slot.set_float(_WEIGHT, weight)

    @property
    def expected_group_size(self) -> int:
        """How many peers (this one included) are expected to average in this round; 0: unknown. A leader whose
        group has them all starts it once triggered instead of waiting out its matchmaking time."""
        return self._slot.get_int(_EXPECTED_GROUP_SIZE)

    @expected_group_size.setter
    def expected_group_size(self, size: int) -> None:
        self._slot.set_int(_EXPECTED_GROUP_SIZE, max(0, int(size)))

    @property
    def stage(self) -> AveragingStage:
        return AveragingStage(self._slot.get_int(_STAGE))

    @stage.setter
    def stage(self, stage: AveragingStage) -> None:
        if stage == AveragingStage.RUNNING_ALLREDUCE:
            self._slot.set_int(_BEGAN_ALLREDUCE, 1)
        self._slot.set_int(_STAGE, stage.value)

    @property
    def began_allreduce(self) -> bool:
        return self._slot.get_int(_BEGAN_ALLREDUCE) == 1

    # ------------------------------------------------------------------ read-only

    @property
    def data_for_gather(self) -> bytes:
        return self._data_for_gather

    @property
    def deadline(self) -> Optional[DHTExpiration]:
        return self._deadline

    @property
    def allow_retries(self) -> bool:
        return self._allow_retries

    def get_timeout(self) -> Optional[float]:
        """Seconds left until the deadline (0 if it has passed), or None if the step has none."""
        if self._deadline is None:
            return None
        return max(0.0, self._deadline - get_dht_time())

    def cancel(self) -> bool:
        """Cancel the step: matchmaking stops; a running all-reduce is abandoned (the group sees this peer fail)."""
        if self._shared is not None and self.began_allreduce and not self.done():
            logger.warning("Cancelling a step whose all-reduce has begun: the rest of the group will see it fail")
        return super().cancel()

    def __repr__(self) -> str:
        try:
            details = f"stage={self.stage.name}, weight={self.weight}, triggered={self.triggered}"
        except (ValueError, TypeError, RuntimeError):
            details = "state unavailable"
        return f"<StepControl {details} {super().__repr__()}>"
