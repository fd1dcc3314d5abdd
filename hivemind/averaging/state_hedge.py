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

Priority still decides when it can: a donor that starts while a donor of higher priority asked before it is still
preparing is held (its stream open, nothing more read) until that one starts (and wins), fails, or its own wait for a
first message ends, but for at most ``hold_limit`` seconds and half the time left before the deadline. So an idle
peer with an old state does not beat an up-to-date donor that is merely a few seconds slow, and silent hostile donors
of the highest priority cost a newcomer at most one such wait in all, not one per identity.
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
    """The downloads asked so far that have not started yet, in the order they were asked, and the ones that started
    but were set aside for a better one (``stopped_early``: already open, closed by ``stop``)."""

    def __init__(self) -> None:
        self.pending: Dict[asyncio.Task, Tuple[T, S]] = {}
        self.stopped_early: List[Tuple[T, S]] = []
        self._order: Dict[int, int] = {}  # id(download) -> when it was asked

    def launch(self, candidate: T, download: S) -> None:
        self._order[id(download)] = len(self._order)
        self.pending[asyncio.create_task(download.start(), name=f"start download {candidate}")] = (candidate, download)

    async def stop(self) -> List[Tuple[T, S, Optional[BaseException]]]:
        """Cancel every pending start and wait for it; returns ``(candidate, download, error)`` in the order asked
        (error None: it was stopped, set aside, or had started just before; either way its download is closed)."""
        entries, self.pending = list(self.pending.items()), {}
        early, self.stopped_early = self.stopped_early, []
        for task, _ in entries:
            task.cancel()
        try:
            if entries:
                await asyncio.wait([task for task, _ in entries])
        except BaseException:  # cancelled meanwhile: a start that had already succeeded is closed here all the same
            for task, (_, download) in entries:  # (one still unwinding closes its own: see Startable)
                if task.done() and not task.cancelled() and task.exception() is None:
                    await download.aclose()
            for _, download in early:
                await download.aclose()
            raise
        stopped = [(candidate, download, None) for candidate, download in early]
        for task, (candidate, download) in entries:
            stopped.append((candidate, download, None if task.cancelled() else task.exception()))
        stopped.sort(key=lambda entry: self._order[id(entry[1])])
        for _, download, _ in stopped:
            await download.aclose()
        return stopped


async def first_to_start(
    candidates: List[T],
    open_download: Callable[[T], S],
    hedge_delay: float,
    deadline: Optional[float] = None,
    on_failure: Optional[Callable[[T, BaseException], None]] = None,
    describe: Callable[[T], str] = str,
    priority: Optional[Callable[[T], float]] = None,
    hold_limit: float = 0.0,
    allowed: Optional[Callable[[T], bool]] = None,
    allowed_from: Optional[Callable[[], float]] = None,
) -> Optional[Tuple[T, S]]:
    """Start downloads from ``candidates`` (best first) with hedging; return the first that started, or None.

    Takes the candidates it asks from the front of ``candidates`` (a list it changes in place): a candidate whose start
    fails is dropped and reported to ``on_failure``; the ones stopped because another started first are put back at
    the front, in their order. The winner's download is open: the caller finishes and closes it.

    :param open_download: makes the (not yet started) download of one candidate
    :param hedge_delay: seconds to wait for the downloads asked so far to start before asking the next candidate
    :param deadline: ``time.monotonic()`` after which no more candidates are asked and None is returned
    :param describe: a candidate's name for the log
    :param priority: a candidate's priority; a download that starts while one of higher priority is still pending is
      held for up to ``hold_limit`` seconds (and at most half the time left before ``deadline``) for that one
    :param allowed: whether the next candidate may be asked now (else none after it is, and None may be returned with
      candidates left; default: always)
    :param allowed_from: the ``time.monotonic()`` from which the candidates ``allowed`` holds back may be asked: the
      wait for the pending downloads ends then, so that they are asked (hedged) rather than after those end
    """
    if not hedge_delay > 0:
        raise ValueError(f"hedge_delay must be a positive number of seconds, got {hedge_delay!r}")
    race: _Race[T, S] = _Race()
    winner: Optional[Tuple[T, S]] = None
    held: Optional[Tuple[T, S]] = None  # started, waiting for a better one still pending (see the module docstring)
    held_until = 0.0
    rank = priority if priority is not None else (lambda candidate: 0.0)
    next_launch = time.monotonic()

    def better_pending() -> bool:
        return held is not None and any(rank(entry[0]) > rank(held[0]) for entry in race.pending.values())

    try:
        while winner is None:
            now = time.monotonic()
            if held is not None and (not better_pending() or now >= held_until):
                winner, held = held, None
                break
            if deadline is not None and now >= deadline:
                break
            launchable = bool(candidates) and (allowed is None or allowed(candidates[0]))
            if held is None and launchable and (not race.pending or now >= next_launch):
                candidate = candidates.pop(0)
                race.launch(candidate, open_download(candidate))
                next_launch = now + hedge_delay
                continue
            if not race.pending:
                break
            wait = max(next_launch - now, 0.0) if launchable and held is None else None
            if held is None and candidates and not launchable and allowed_from is not None:
                until = max(allowed_from() - now, 0.05)  # (then ``allowed`` is asked again)
                wait = until if wait is None else min(wait, until)
            if held is not None:
                wait = held_until - now if wait is None else min(wait, held_until - now)
            if deadline is not None:
                wait = deadline - now if wait is None else min(wait, deadline - now)
            done, _ = await asyncio.wait(race.pending, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
            for task in [task for task in race.pending if task in done]:  # in the order asked: the better one first
                error = asyncio.CancelledError() if task.cancelled() else task.exception()
                if error is None:
                    if held is None or rank(race.pending[task][0]) > rank(held[0]):
                        if held is not None:  # a better one started: the held one goes back with the stopped ones
                            race.stopped_early.append(held)
                        else:
                            held_until = time.monotonic() + hold_limit
                            if deadline is not None:
                                held_until = min(held_until, time.monotonic() + (deadline - time.monotonic()) / 2)
                        held = race.pending.pop(task)
                    else:  # started too, but no better than the one held: set aside, closed and put back later
                        race.stopped_early.append(race.pending.pop(task))
                    continue
                candidate, _ = race.pending.pop(task)
                if on_failure is not None:
                    on_failure(candidate, error)
                next_launch = time.monotonic()  # replace a failed donor at once, as without hedging
    finally:
        if held is not None:  # the deadline came, or we were cancelled, while holding: it goes back too
            race.stopped_early.append(held)
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
