"""When does the swarm's epoch advance? The progress rules of hivemind.Optimizer as plain functions over values.

Nothing here does I/O or reads a clock: callers pass ``now`` (DHT time, seconds) and the progress records they have.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import AbstractSet, Any, Iterable, Optional, Protocol

__all__ = [
    "PeerProgress",
    "GlobalTrainingProgress",
    "RefreshPolicy",
    "summarize_swarm",
    "is_time_for_global_step",
    "next_epoch",
    "epoch_after_gradient_round",
    "should_load_state",
    "is_synchronized",
    "should_schedule_averaging",
    "count_expected_peers",
    "state_round_epochs",
    "state_round_weight",
    "MAX_EPOCH",
]

# No honest swarm gets near this epoch; a record or state claiming more is refused, so that the local epoch (which
# jumps to the largest one seen) stays far below 2 ** 64, the largest integer msgpack can publish.
MAX_EPOCH = 2**62


class PeerProgress(Protocol):
    """What the rules read from one peer's progress record (LocalTrainingProgress satisfies this)."""

    peer_id: bytes
    epoch: int
    samples_accumulated: int
    samples_per_second: float
    time: float  # DHT time of the report, seconds
    client_mode: bool


@dataclass
class GlobalTrainingProgress:
    """The swarm's progress as one peer sees it."""

    epoch: int  # the highest epoch any peer reported
    samples_accumulated: int  # samples reported for that epoch by all peers in it
    target_batch_size: int  # samples that end one epoch
    num_peers: int  # peers with a live progress record
    num_clients: int  # of those, peers in client mode
    eta_next_epoch: float  # DHT time at which the epoch is expected to end
    next_fetch_time: float  # DHT time at which the swarm's progress should be fetched again


# pickled under hivemind 1.1.12's name (it is re-exported there), so that the original unpickles ours
GlobalTrainingProgress.__module__ = "hivemind.optim.progress_tracker"


@dataclass(frozen=True)
class RefreshPolicy:
    """How often a peer re-reads the swarm's progress (all in seconds).

    The ETA of the next epoch is an estimate that drifts (peers speed up, join and leave); the closer it is, the more
    often it is worth refreshing. The delay is ``expected_drift_rate`` of the time left, scaled up when more peers
    than ``expected_drift_peers`` take part (each peer's change moves the total less), within [min, max] periods.
    """

    min_refresh_period: float = 0.5
    max_refresh_period: float = 10.0
    default_refresh_period: float = 3.0  # when nobody else reports progress
    expected_drift_peers: float = 3.0
    expected_drift_rate: float = 0.2

    def __post_init__(self):
        if not 0 <= self.min_refresh_period <= self.max_refresh_period:
            raise ValueError(
                f"refresh periods must satisfy 0 <= min <= max, got min={self.min_refresh_period}, "
                f"max={self.max_refresh_period}"
            )

    def delay(self, time_to_eta: float, num_peers: int) -> float:
        """Seconds until the next fetch, given the estimated seconds until the epoch ends."""
        if num_peers <= 1:  # alone (or nobody visible): nothing to learn beyond newcomers
            return float(min(max(self.default_refresh_period, self.min_refresh_period), self.max_refresh_period))
        peer_factor = max(1.0, num_peers / max(self.expected_drift_peers, 1e-9))
        delay = max(0.0, time_to_eta) * self.expected_drift_rate * peer_factor
        return float(min(max(delay, self.min_refresh_period), self.max_refresh_period))


def _finite_or_zero(value: float) -> float:
    return value if math.isfinite(value) and value > 0 else 0.0


def summarize_swarm(
    records: Iterable[PeerProgress],
    *,
    target_batch_size: int,
    now: float,
    local_record: Optional[PeerProgress] = None,
    refresh_policy: RefreshPolicy = RefreshPolicy(),
    max_extrapolation: float = 60.0,
) -> GlobalTrainingProgress:
    """
    Aggregate the peers' latest progress records into the swarm's progress.

    The global epoch is the highest reported epoch; only peers in that epoch count toward its samples. The ETA
    assumes each such peer keeps its reported speed since its report (at most ``max_extrapolation`` seconds, the
    lifetime of a record), so a swarm whose reports are a few seconds old is not judged late.

    :param records: other peers' records (those of this peer are ignored if ``local_record`` is given)
    :param local_record: this peer's current progress, which is newer than whatever the DHT returned for it
    """
    records = list(records)
    if local_record is not None:
        records = [record for record in records if record.peer_id != local_record.peer_id] + [local_record]
    if not records:
        return GlobalTrainingProgress(0, 0, target_batch_size, 0, 0, eta_next_epoch=math.inf, next_fetch_time=now)

    epoch = max(record.epoch for record in records)
    current = [record for record in records if record.epoch == epoch]
    samples_accumulated = sum(record.samples_accumulated for record in current)
    speed = sum(_finite_or_zero(record.samples_per_second) for record in current)
    expected_samples = float(samples_accumulated)
    for record in current:
        elapsed = min(max(0.0, now - record.time), max_extrapolation) if math.isfinite(record.time) else 0.0
        expected_samples += _finite_or_zero(record.samples_per_second) * elapsed

    samples_left = target_batch_size - expected_samples
    if samples_left <= 0:
        eta = now
    elif speed > 0 and samples_left / speed < 1e9:
        eta = now + samples_left / speed
    else:  # nobody makes progress (fresh peers publish a speed of 1e-20): only a report or a newer epoch ends this one
        eta = math.inf
    time_to_eta = eta - now if math.isfinite(eta) else refresh_policy.max_refresh_period
    next_fetch_time = now + refresh_policy.delay(time_to_eta, len(records))
    return GlobalTrainingProgress(
        epoch=epoch,
        samples_accumulated=samples_accumulated,
        target_batch_size=target_batch_size,
        num_peers=len(records),
        num_clients=sum(bool(record.client_mode) for record in records),
        eta_next_epoch=eta,
        next_fetch_time=next_fetch_time,
    )


def is_time_for_global_step(local_epoch: int, swarm: GlobalTrainingProgress, now: float) -> bool:
    """
    A peer runs its global update when another peer is already in a later epoch, when the samples reported for the
    current epoch reach the target batch size, or when the estimated end of the epoch has passed.
    """
    return (
        swarm.epoch > local_epoch
        or swarm.samples_accumulated >= swarm.target_batch_size
        or now >= swarm.eta_next_epoch
    )


def next_epoch(local_epoch: int, global_epoch: int) -> int:
    """The epoch after a global update: one more than before, or the swarm's epoch if that is further ahead."""
    return max(local_epoch + 1, global_epoch)


def epoch_after_gradient_round(local_epoch: int, global_epoch: int, round_epochs: Iterable[Any]) -> int:
    """
    The epoch after a global update whose gradient round gathered ``round_epochs`` (the epochs the members were
    in; anything but an int is ignored): every member applied the same averaged gradient, so all of them must land
    in the same epoch, one past the latest epoch among them. Without this, a member one epoch behind the others
    (e.g. one that joined a round of peers that had just advanced) would land one epoch behind them again at every
    round, and no state average of the swarm would ever be applied (they mix two epochs). A member's epoch counts
    only up to the swarm's (signed) epoch, or one past this peer's, so a peer that lies about its epoch cannot make
    the others jump ahead.
    """
    epoch = next_epoch(local_epoch, global_epoch)
    limit = max(global_epoch, local_epoch + 1)
    for value in round_epochs:
        if isinstance(value, int) and not isinstance(value, bool) and local_epoch < value <= limit:
            epoch = max(epoch, value + 1)
    return epoch


def state_round_epochs(gathered: Iterable[Any]) -> list:
    """The epochs that the members of a state round gathered (anything but an int within MAX_EPOCH is left out)."""
    return [v for v in gathered if isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_EPOCH]


def state_round_weight(own: Any, gathered: Iterable[Any], weight: float, spread: int = 0) -> float:
    """
    This member's weight in a state round whose members gathered ``gathered`` (their epochs; ``own`` is this
    member's): 0 if it is more than ``spread`` epochs behind the latest epoch among them, else ``weight``. A
    straggler's parameters are an epoch's change or more behind: averaged in, they would pull the peers in step
    back. With weight 0 it only lends its bandwidth, and the members in step still get the average of each other
    (a straggler catches up by the gradient rounds or by downloading the state).
    """
    epochs = state_round_epochs(gathered)
    if not state_round_epochs([own]) or weight <= 0:  # (anything but an epoch: not a round of this rule)
        return weight
    return 0.0 if own < max(epochs) - spread else weight


def should_load_state(local_epoch: int, global_epoch: int, *, strict: bool) -> bool:
    """
    Whether a peer is too far behind the swarm and must download the state instead of applying its gradients.

    :param strict: True for the one check per epoch made after the swarm's progress was first fetched in that epoch
      (any lag counts); otherwise only a lag of more than one epoch counts, since peers that just advanced make the
      swarm look one epoch ahead for a moment.
    """
    if strict:
        return local_epoch < global_epoch
    return local_epoch < global_epoch - 1


def is_synchronized(local_epoch: int, global_epoch: int) -> bool:
    """A peer is in sync when it is at most one epoch behind the swarm."""
    return local_epoch >= global_epoch - 1


def should_schedule_averaging(
    eta_next_epoch: float, now: float, matchmaking_time: float, already_scheduled: bool
) -> bool:
    """Start looking for an averaging group ahead of time once the epoch is expected to end within matchmaking_time."""
    return not already_scheduled and eta_next_epoch - now <= matchmaking_time


def count_expected_peers(
    records: Iterable[PeerProgress],
    local_epoch: int,
    last_round_peers: Optional[AbstractSet[bytes]],
    epoch_started_at: float = math.inf,
) -> int:
    """
    How many peers (this one included, through its own record) are expected to average at the end of
    ``local_epoch``: those that report this epoch or a later one, and those that still report the previous epoch
    but either averaged with this peer in the last round (they are finishing that round's step and will report this
    epoch in a moment) or reported it at or after ``epoch_started_at``, the DHT time at which this peer entered
    ``local_epoch`` (they are alive and catching up, e.g. a newcomer that downloaded the state of an epoch that
    ended meanwhile: not waiting for it would leave it behind again at each of its steps whenever epochs are shorter
    than its steps). A record stopped in an older epoch, or in the previous one before this peer left it by a peer
    that was not in the last round, belongs to a peer that is gone or lagging: nobody waits for it.
    ``last_round_peers=None`` (no round known yet) counts every record of the previous epoch.
    """
    expected = set()
    for record in records:
        in_last_round = last_round_peers is None or record.peer_id in last_round_peers
        catching_up = record.time >= epoch_started_at
        if record.epoch >= local_epoch or (record.epoch == local_epoch - 1 and (in_last_round or catching_up)):
            expected.add(record.peer_id)
    return len(expected)
