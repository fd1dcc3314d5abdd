"""A floor on how fast the other end of a state download moves it along (no I/O: the caller reports the clock).

Each end of a state download waits on the other: the donor waits for the downloader to take each chunk (its send
blocks while the buffers between them are full), the downloader waits for the donor's next chunk. A limit per chunk
alone bounds neither end's total wait: a peer that moves one chunk just before every limit holds the other for hours,
and a downloader that does so holds one of the donor's few download slots all that time.

So each end also counts the bytes that went through and the seconds it spent waiting on the other end, and gives up
on that peer once it waited longer than ``grace + moved / min_rate`` seconds: the other end must move at least
``min_rate`` bytes per second of waiting on it, after ``grace`` seconds. A download of ``S`` bytes therefore never
keeps its peer waiting longer than ``grace + S / min_rate`` seconds, a bound that follows the state's size, and a peer
that keeps above the floor always finishes, however long that takes. Time that an end spends on its own work (taking a
snapshot, encoding, decoding) is not waiting and never counts against the other.

On the donor's side, bytes count as moved once they are handed to the stream, and the buffers between two daemons
hold tens of MiB (about 24 MiB between two p2pd on one machine): so a reader that stalls right after the start is
dropped after ``grace + buffered / min_rate`` seconds, about 7.5 minutes with the defaults; one that takes no chunk
at all for the donor's send_stall_timeout (60 s) is dropped sooner by that limit. Smaller windows would misjudge
honest readers: the buffers release space in bursts of several MiB, so a steady reader looks stalled between them.

The defaults need no tuning: 64 KiB/s (half a megabit per second) is far below any link that can usefully download a
model's state (100 MB take 26 minutes at that rate), and 60 s of grace cover starting up. The floor applies to each
download: a donor whose uplink is shared by several downloads below the floor drops them too, and the newcomers then
try other donors; set the rate to None to turn the floor off. An averager (and so ``hivemind.Optimizer``) uses
:func:`configured_min_rate` on both ends: the default, or the ``HIVEMIND_STATE_MIN_RATE`` environment variable of
its process (bytes per second; ``0`` or ``none`` turns the floor off), e.g. for peers on links slower than the floor.
"""

from __future__ import annotations

import os
from typing import Optional

__all__ = ["RateFloor", "DEFAULT_MIN_RATE", "DEFAULT_RATE_GRACE", "MIN_RATE_ENV", "configured_min_rate"]

DEFAULT_MIN_RATE = 64 * 1024.0  # bytes per second of waiting that the other end must move, on average
DEFAULT_RATE_GRACE = 60.0  # seconds of waiting allowed on top of what the bytes moved so far earn
MIN_RATE_ENV = "HIVEMIND_STATE_MIN_RATE"  # overrides DEFAULT_MIN_RATE for averagers (bytes/s; 0 or none: no floor)


def configured_min_rate() -> Optional[float]:
    """The floor an averager keeps on both ends of its state downloads: DEFAULT_MIN_RATE unless the environment sets
    ``HIVEMIND_STATE_MIN_RATE`` (bytes per second; ``0`` or ``none``: no floor). Raises ValueError for other values."""
    value = os.environ.get(MIN_RATE_ENV)
    if value is None or not value.strip():
        return DEFAULT_MIN_RATE
    if value.strip().lower() in ("0", "none", "off"):
        return None
    try:
        rate = float(value)
    except ValueError:
        rate = float("nan")
    if not rate > 0 or rate == float("inf"):
        raise ValueError(
            f"{MIN_RATE_ENV}={value!r} is not a positive number of bytes per second: set it to e.g. 16384 for a "
            "floor of 16 KiB/s, to 0 or none for no floor, or unset it for the default (65536)"
        )
    return rate


class RateFloor:
    """Checks that the other end of a transfer moves at least ``min_rate`` bytes per second spent waiting on it.

    Call :meth:`wait_started` before waiting on the other end and :meth:`wait_ended` after (with the bytes that the
    wait moved), and :meth:`check` whenever convenient, also while a wait is in progress; it returns why the other end
    is too slow, or None. Times are the caller's clock, in seconds.

    :param min_rate: bytes per second of waiting (None: no floor, :meth:`check` always returns None)
    :param grace: seconds of waiting allowed on top of ``moved / min_rate``
    """

    def __init__(self, min_rate: Optional[float], grace: float):
        if min_rate is not None and not (isinstance(min_rate, (int, float)) and min_rate > 0):
            raise ValueError(f"min_rate must be a positive number of bytes per second or None, got {min_rate!r}")
        if not (isinstance(grace, (int, float)) and grace >= 0):
            raise ValueError(f"grace must be a non-negative number of seconds, got {grace!r}")
        self.min_rate, self.grace = min_rate, float(grace)
        self.moved = 0  # bytes moved so far
        self.waited = 0.0  # seconds spent waiting on the other end, not counting a wait in progress
        self._waiting_since: Optional[float] = None

    def wait_started(self, now: float) -> None:
        self._waiting_since = now

    def wait_ended(self, now: float, moved_bytes: int) -> None:
        self.waited = self.waited_until(now)
        self._waiting_since = None
        self.moved += moved_bytes

    def waited_until(self, now: float) -> float:
        """Seconds spent waiting on the other end so far, a wait in progress included."""
        in_progress = 0.0 if self._waiting_since is None else max(now - self._waiting_since, 0.0)
        return self.waited + in_progress

    def check(self, now: float) -> Optional[str]:
        """None while the other end keeps above the floor; else a sentence saying how slow it was."""
        if self.min_rate is None:
            return None
        waited = self.waited_until(now)
        if waited <= self.grace + self.moved / self.min_rate:
            return None
        return (
            f"it moved {self.moved} bytes in {waited:.1f} s of waiting on it, less than the floor of "
            f"{self.min_rate:.0f} bytes per second of waiting (after {self.grace:g} s of grace)"
        )
