"""Hedged start of a state download: when the best donor has not started sending within a delay, ask the next too.

A donor sends nothing until it has a free download slot and a snapshot of its state, so an honest but busy donor may
keep a newcomer waiting for its first message for many seconds, and a hostile one that declared the highest priority
can do the same and then send nothing. Waiting for each donor in turn let a few such identities hold a newcomer for
minutes. So the waits overlap: the best donor is asked first; whenever ``hedge_delay`` seconds pass with no asked donor
having started, the next one is asked as well (and at once when an asked donor fails). The first donor whose first
message arrives and is valid wins; the others are stopped (their streams closed, which takes us out of their queues)
and go back, in their order, to the front of the candidates: they did not fail, they only came second, so they are
asked again if the winner fails later. Each donor keeps its own full wait for its first message, so a donor that
queues a newcomer and then serves it still works when nobody else starts sooner.

A newcomer thus asks at most one more donor per ``hedge_delay`` while none of them has started, and holds no more
than one stream once one has; donors protect themselves as before (a bounded queue, busy refusals).
"""

from __future__ import annotations

import asyncio
import time
from typing import Callable, Dict, Generic, List, Optional, Protocol, Tuple, TypeVar

from hivemind.utils.logging import get_logger

__all__ = ["Startable", "first_to_start"]

logger = get_logger(__name__)

T = TypeVar("T")


class Startable(Protocol):
    """A download that can be started (open it and take its first message) and closed at any time (idempotent).

    A start that fails or is cancelled closes what it opened itself."""

    async def start(self) -> None: ...

    async def aclose(self) -> None: ...


S = TypeVar("S", bound=Startable)


class _Race(Generic[T, S]):
    """The downloads asked so far that have not started yet, in the order they were asked."""

    def __init__(self) -> None:
        self.pending: Dict[asyncio.Task, Tuple[T, S]] = {}

    def launch(self, candidate: T, download: S) -> None:
        self.pending[asyncio.create_task(download.start(), name=f"start download {candidate}")] = (candidate, download)

    async def stop(self) -> List[Tuple[T, S, Optional[BaseException]]]:
        """Cancel every pending start and wait for it; returns ``(candidate, download, error)`` in the order asked
        (error None: it was stopped, or had started just before; either way its download is closed)."""
        entries, self.pending = list(self.pending.items()), {}
        for task, _ in entries:
            task.cancel()
        try:
            if entries:
                await asyncio.wait([task for task, _ in entries])
        except BaseException:  # cancelled meanwhile: a start that had already succeeded is closed here all the same
            for task, (_, download) in entries:  # (one still unwinding closes its own: see Startable)
                if task.done() and not task.cancelled() and task.exception() is None:
                    await download.aclose()
            raise
        stopped = []
        for task, (candidate, download) in entries:
            error = None if task.cancelled() else task.exception()
            await download.aclose()
            stopped.append((candidate, download, error))
        return stopped


async def first_to_start(
    candidates: List[T],
    open_download: Callable[[T], S],
    hedge_delay: float,
    deadline: Optional[float] = None,
    on_failure: Optional[Callable[[T, BaseException], None]] = None,
    describe: Callable[[T], str] = str,
) -> Optional[Tuple[T, S]]:
    """Start downloads from ``candidates`` (best first) with hedging; return the first that started, or None.

    Takes the candidates it asks from the front of ``candidates`` (a list it changes in place): a candidate whose start
    fails is dropped and reported to ``on_failure``; the ones stopped because another started first are put back at
    the front, in their order. The winner's download is open: the caller finishes and closes it.

    :param open_download: makes the (not yet started) download of one candidate
    :param hedge_delay: seconds to wait for the downloads asked so far to start before asking the next candidate
    :param deadline: ``time.monotonic()`` after which no more candidates are asked and None is returned
    :param describe: a candidate's name for the log
    """
    if not hedge_delay > 0:
        raise ValueError(f"hedge_delay must be a positive number of seconds, got {hedge_delay!r}")
    race: _Race[T, S] = _Race()
    winner: Optional[Tuple[T, S]] = None
    next_launch = time.monotonic()
    try:
        while winner is None:
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                break
            if candidates and (not race.pending or now >= next_launch):
                candidate = candidates.pop(0)
                race.launch(candidate, open_download(candidate))
                next_launch = now + hedge_delay
                continue
            if not race.pending:
                break
            wait = max(next_launch - now, 0.0) if candidates else None
            if deadline is not None:
                wait = deadline - now if wait is None else min(wait, deadline - now)
            done, _ = await asyncio.wait(race.pending, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
            for task in [task for task in race.pending if task in done]:  # in the order asked: the better one first
                error = asyncio.CancelledError() if task.cancelled() else task.exception()
                if error is None:
                    if winner is None:  # (one that started at the same time stays: it is stopped with the rest)
                        winner = race.pending.pop(task)
                    continue
                candidate, _ = race.pending.pop(task)
                if on_failure is not None:
                    on_failure(candidate, error)
                next_launch = time.monotonic()  # replace a failed donor at once, as without hedging
    finally:
        try:
            stopped = await race.stop()
        except BaseException:
            if winner is not None:
                await winner[1].aclose()
            raise
        for candidate, _, error in reversed(stopped):
            if error is not None and not isinstance(error, asyncio.CancelledError):
                if on_failure is not None:
                    on_failure(candidate, error)
            else:
                candidates.insert(0, candidate)
        if winner is not None and stopped:
            names = ", ".join(describe(candidate) for candidate, _, _ in stopped)
            logger.info(f"{describe(winner[0])} started sending first; stopped waiting for {names}")
    return winner
