"""Timeouts of one all-reduce round, derived from measured bandwidth, vector size and group size (no I/O here).

With no timeouts given, a round's deadlines follow from how long its transfers should take: each member sends
and receives about ``2 * (n - 1) / n`` of the vector, at the bandwidth measured over past rounds (an exponential
moving average; a conservative guess before the first round). Generous safety factors and floors keep loopback
rounds from timing out on a busy machine, and slow links get proportionally longer deadlines. Explicit values
always win.

A round that cut a sender for being slow (behind at the round's last calls) measures nothing about the links, but the
pace at which that sender did deliver says how long the round would have needed: the next rounds' derived
``allreduce_timeout`` is stretched so that such a round ends at ``FINISH_SHARE`` of it, at most ``STRETCH_GROWTH``
times more per round and ``MAX_STRETCH`` times in all (a stalling hostile peer costs at most that), and the stretch
shrinks back (at most halved per round) once rounds complete in less time.

Rounds that complete late lower the measured bandwidth, and with it raise the next deadlines: a member that made every
round end just before the last calls would make them grow ~1.27x per round without end. So the bandwidth estimate
never drops below ``1 / MAX_SLOWDOWN`` of the best it has had, and the derived ``allreduce_timeout``, stretch included,
never exceeds ``MAX_SLOWDOWN`` times the one that best bandwidth gives: an honest network that slows down is followed
that far, beyond it only an explicit ``allreduce_timeout`` helps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

__all__ = ["RoundDeadlines", "AdaptiveDeadlines", "SenderPace", "MAX_DEADLINE_SENDERS", "MAX_STRETCH", "MAX_SLOWDOWN"]

# derived deadlines grow with the group size up to this many concurrent senders (groups of 16), no further
MAX_DEADLINE_SENDERS = 15
# after rounds that cut slow senders: the derived allreduce_timeout is stretched so that a round at their pace ends at
# this share of it (before the last calls, from 85%), by at most this factor per round and this factor in all; rounds
# that complete let it shrink back by at most this factor per round, to what their own duration needs
FINISH_SHARE, STRETCH_GROWTH, MAX_STRETCH, STRETCH_DECAY = 0.6, 2.0, 4.0, 0.5
# the bandwidth estimate stays above 1/MAX_SLOWDOWN of the best it has had, and the derived allreduce_timeout (stretch
# included) within MAX_SLOWDOWN times the one the best bandwidth gives: how far rounds can push the derived deadlines
MAX_SLOWDOWN = 4.0


@dataclass(frozen=True)
class RoundDeadlines:
    sender_timeout: Optional[float]  # max wait for a sender's next part (seconds)
    reducer_timeout: Optional[float]  # max wait for a reducer's next averaged part (seconds)
    allreduce_timeout: Optional[float]  # max duration of the whole all-reduce (seconds)
    stretch: float = 1.0  # the derived allreduce_timeout is this many times the one the links alone give
    # the derived allreduce_timeout was held back: the bandwidth estimate is at its floor (and the timeout above its
    # minimum), or the stretched timeout was cut to MAX_SLOWDOWN times the one the best bandwidth gives
    limited: bool = False


class AdaptiveDeadlines:
    """
    :param sender_timeout: explicit sender timeout, s (None: derived)
    :param reducer_timeout: explicit reducer timeout, s (None: derived, or twice an explicit sender timeout)
    :param allreduce_timeout: explicit limit on one all-reduce, s (None: derived; math.inf: no limit)
    :param initial_bandwidth: bytes/s assumed before any round was measured
    :param ema_alpha: weight of the newest measurement in the bandwidth average
    :param safety_factor: deadlines are this many times the expected duration
    :param min_sender_timeout: floor of the derived sender timeout, s (the reducer's floor is twice this)
    :param min_allreduce_timeout: floor of the derived all-reduce timeout, s
    """

    def __init__(
        self,
        *,
        sender_timeout: Optional[float] = None,
        reducer_timeout: Optional[float] = None,
        allreduce_timeout: Optional[float] = None,
        initial_bandwidth: float = 10e6,
        ema_alpha: float = 0.3,
        safety_factor: float = 4.0,
        min_sender_timeout: float = 5.0,
        min_allreduce_timeout: float = 30.0,
    ):
        for name, value in (("sender_timeout", sender_timeout), ("reducer_timeout", reducer_timeout)):
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number of seconds, got {value}")
        if allreduce_timeout is not None and not allreduce_timeout > 0:  # (NaN too; inf: no limit)
            raise ValueError(f"allreduce_timeout must be a positive number of seconds, got {allreduce_timeout}")
        if sender_timeout is not None and reducer_timeout is not None and reducer_timeout <= sender_timeout:
            raise ValueError(
                f"reducer_timeout ({reducer_timeout} s) must exceed sender_timeout ({sender_timeout} s): a reducer "
                "waits for the slowest sender before it can answer"
            )
        if not (initial_bandwidth > 0 and 0 < ema_alpha <= 1 and safety_factor >= 1):
            raise ValueError("initial_bandwidth must be positive, ema_alpha in (0, 1] and safety_factor >= 1")
        self.explicit_sender, self.explicit_reducer = sender_timeout, reducer_timeout
        self.explicit_allreduce = allreduce_timeout
        self.bandwidth, self.measured_rounds = float(initial_bandwidth), 0
        self.best_bandwidth: Optional[float] = None  # the highest estimate after a measured round
        self.ema_alpha, self.safety_factor = ema_alpha, safety_factor
        self.min_sender_timeout, self.min_allreduce_timeout = min_sender_timeout, min_allreduce_timeout
        self.stretch = 1.0  # learned from rounds that cut slow senders (see record_cut_round)

    @staticmethod
    def bytes_per_member(vector_bytes: int, group_size: int) -> float:
        """Bytes one member sends plus receives in a butterfly all-reduce of ``vector_bytes`` over the group."""
        if group_size <= 1:
            return 0.0
        return 2.0 * vector_bytes * (group_size - 1) / group_size

    def record_round(
        self, vector_bytes: int, group_size: int, seconds: float, deadlines: Optional[RoundDeadlines] = None
    ) -> None:
        """Update the bandwidth estimate with a finished round (its all-reduce took ``seconds``). Pass only rounds in
        which every member delivered: one that waited out a stalled peer measures a timeout, not the links. With the
        round's ``deadlines``, a stretch learned from rounds that cut slow senders shrinks towards what this round
        needed (at most halved). The estimate never drops below 1/MAX_SLOWDOWN of the best it has had."""
        moved = self.bytes_per_member(vector_bytes, group_size)
        if moved <= 0 or not (math.isfinite(seconds) and seconds > 0):
            return
        if deadlines is not None:
            target = self._stretch_for(seconds, deadlines)
            if target is not None:
                self.stretch = max(1.0, min(self.stretch, max(target, STRETCH_DECAY * self.stretch)))
        measured = moved / seconds
        if self.measured_rounds == 0:
            self.bandwidth = measured
        else:
            self.bandwidth = self.ema_alpha * measured + (1 - self.ema_alpha) * self.bandwidth
        self.measured_rounds += 1
        if self.best_bandwidth is not None:
            self.bandwidth = max(self.bandwidth, self.best_bandwidth / MAX_SLOWDOWN)
        self.best_bandwidth = max(self.best_bandwidth or 0.0, self.bandwidth)

    @property
    def at_floor(self) -> bool:
        """Whether the bandwidth estimate is held at 1/MAX_SLOWDOWN of the best it has had."""
        return self.best_bandwidth is not None and self.bandwidth * MAX_SLOWDOWN <= self.best_bandwidth * (1 + 1e-9)

    def record_cut_round(self, deadlines: RoundDeadlines, needed_seconds: float) -> None:
        """A round with ``deadlines`` cut senders at its last calls for being slow; at the pace they delivered their
        parts, it would have needed ``needed_seconds``. Stretches the next rounds' derived allreduce_timeout so that
        such a round ends at FINISH_SHARE of it: at most STRETCH_GROWTH times more than now, MAX_STRETCH in all."""
        target = self._stretch_for(needed_seconds, deadlines)
        if target is not None:
            self.stretch = min(MAX_STRETCH, STRETCH_GROWTH * self.stretch, max(self.stretch, target))

    def _stretch_for(self, seconds: float, deadlines: RoundDeadlines) -> Optional[float]:
        """The stretch with which a round of ``seconds`` would end at FINISH_SHARE of the round's derived timeout
        (None: that timeout was given, not derived)."""
        if self.explicit_allreduce is not None or not deadlines.allreduce_timeout:
            return None
        if not (math.isfinite(seconds) and seconds > 0):
            return None
        unstretched = deadlines.allreduce_timeout / deadlines.stretch
        return seconds / (FINISH_SHARE * unstretched)

    def for_round(self, vector_bytes: int, group_size: int, part_bytes: int) -> RoundDeadlines:
        """Deadlines for an all-reduce of ``vector_bytes`` over ``group_size`` members, in parts of ``part_bytes``."""
        sender, reducer, allreduce = self._at_bandwidth(self.bandwidth, vector_bytes, group_size, part_bytes)
        stretch, limited = 1.0, False
        if self.explicit_allreduce is not None:
            allreduce = None if math.isinf(self.explicit_allreduce) else self.explicit_allreduce  # inf: no limit
        else:
            links_alone, allreduce = allreduce, self.stretch * allreduce
            if self.best_bandwidth is not None:
                best = self._at_bandwidth(self.best_bandwidth, vector_bytes, group_size, part_bytes)[2]
                # held back: a lower estimate would give a longer deadline (not one at min_allreduce_timeout, which
                # a small vector's rounds keep whatever their latency), or the stretch was cut
                limited = (
                    self.at_floor and links_alone > self.min_allreduce_timeout
                ) or allreduce > MAX_SLOWDOWN * best
                allreduce = min(allreduce, MAX_SLOWDOWN * best)
            stretch = max(1.0, allreduce / links_alone)
        return RoundDeadlines(sender, reducer, allreduce, stretch, limited)

    def _at_bandwidth(
        self, bandwidth: float, vector_bytes: int, group_size: int, part_bytes: int
    ) -> Tuple[float, float, float]:
        """Sender and reducer timeouts, and the unstretched derived allreduce_timeout, at ``bandwidth``."""
        # a reducer hears from every other member at once: one part from each shares the link. The group size comes
        # from the leader, so its effect is capped: a hostile leader padding the group with thousands of peers that
        # never connect would otherwise stretch every member's wait for them to minutes
        concurrent_senders = min(max(group_size - 1, 1), MAX_DEADLINE_SENDERS)
        # a part never holds more than the whole vector: a small vector's rounds (measured as a low bandwidth, since
        # latency dominates them) must not be charged for a full-sized part
        part_bytes = min(part_bytes, vector_bytes) if vector_bytes > 0 else part_bytes
        expected = self.bytes_per_member(vector_bytes, group_size) / bandwidth
        per_part = self.safety_factor * part_bytes * concurrent_senders / bandwidth
        # nor does one part take longer than the whole exchange (the bandwidth is a per-member figure: charging each
        # part for all senders at once made a 1 s round of a small vector in 16 peers wait 32 s for one part)
        per_part = min(per_part, self.safety_factor * expected)
        sender = self.explicit_sender
        if sender is None:
            sender = max(self.min_sender_timeout, per_part)
            if self.explicit_reducer is not None:
                sender = min(sender, self.explicit_reducer / 2)
        reducer = self.explicit_reducer if self.explicit_reducer is not None else 2 * sender
        return sender, reducer, max(self.min_allreduce_timeout, self.safety_factor * expected + reducer)


class SenderPace:
    """When each sender's parts reached this reducer, to tell a slow but steady sender that will deliver the rest of
    its parts in time (a throttled link) from one that cannot (a stall, or a pace too slow for the round)."""

    def __init__(self):
        self._first: Dict[int, float] = {}  # sender -> time of its first delivered part
        self._last: Dict[int, float] = {}  # sender -> time of its latest delivered part
        self._gap: Dict[int, float] = {}  # sender -> seconds between its two latest delivered parts

    def delivered(self, sender: int, now: float) -> None:
        """Record that ``sender`` delivered one more part at time ``now``."""
        self._first.setdefault(sender, now)
        if sender in self._last:
            self._gap[sender] = now - self._last[sender]
        self._last[sender] = now

    def finishes_by(self, sender: int, delivered: int, total: int, deadline: float, now: float) -> bool:
        """Whether ``sender``, having delivered ``delivered`` of its ``total`` parts, delivers the rest by
        ``deadline`` at its pace so far: the mean period between its deliveries, or the latest one if it is more
        than twice as long (the pace changed: a burst of parts followed by a drip is judged by the drip; a part a
        little late on a busy link is not); its next part is due one such period after its latest, or now if that
        is past. A sender silent since its latest part for more than twice that period has stalled (frozen, or
        hostile): its silence is its pace, and the part it owes is due no sooner than one more such silence from
        now. Senders with fewer than two parts delivered have no pace yet: False."""
        if delivered >= total:
            return True
        if delivered < 2 or sender not in self._gap:
            return False
        first, last = self._first[sender], self._last[sender]
        seconds_per_part, latest, silent = (last - first) / (delivered - 1), self._gap[sender], now - last
        if latest > 2 * seconds_per_part:
            seconds_per_part = latest
        if silent > 2 * seconds_per_part:
            seconds_per_part, next_due = silent, now + silent
        else:
            next_due = max(last + seconds_per_part, now)
        return next_due + (total - delivered - 1) * seconds_per_part <= deadline
