"""One all-reduce at a time on an averager's tensors, in the order in which their groups formed.

A round computes its deltas from the local tensors it reads and adds them at its end: two rounds that overlapped
would both move the tensors from the same values (two peers at 0 and 2 would end at 2 and 0, not at 1). So a round
runs only when no other round of this averager runs. Among rounds released at about the same time, the one whose
group formed first goes first: every member of two such groups sees them form in the same order, so the members
run them in the same order and none waits for a peer busy with the other group. A round whose step still waits for
its trigger (``require_trigger``) holds nobody back.
"""

from __future__ import annotations

import asyncio
from typing import Callable, List

__all__ = ["RoundTurns", "Turn"]


class Turn:
    """One formed group's place in line (see :class:`RoundTurns`)."""

    __slots__ = ("_released", "_is_triggered", "running")

    def __init__(self, is_triggered: Callable[[], bool]):
        self._released, self._is_triggered = False, is_triggered
        self.running = False

    @property
    def released(self) -> bool:
        """Whether its all-reduce may begin: its step was triggered (it waits for its turn, or runs)."""
        if self._released:
            return True
        try:
            return bool(self._is_triggered())
        except Exception:  # e.g. its step is over and its state is gone: it is leaving the line
            return False


class RoundTurns:
    """The rounds of one averager whose groups formed and that have not ended, in the order the groups formed."""

    def __init__(self):
        self._turns: List[Turn] = []
        self._changed = asyncio.Event()

    def join(self, is_triggered: Callable[[], bool] = lambda: False) -> Turn:
        """A group formed: its round takes the last place in line.

        :param is_triggered: whether the round's step was released (read whenever a later round asks for its turn,
          so that one released just before a later one goes first even if its own task has not noticed it yet)
        """
        turn = Turn(is_triggered)
        self._turns.append(turn)
        return turn

    async def wait(self, turn: Turn) -> None:
        """Return once ``turn``'s round may run: no round runs and no released round formed before it."""
        turn._released = True
        self._notify()
        while not self._may_run(turn):
            changed = self._changed
            await changed.wait()
        turn.running = True

    def leave(self, turn: Turn) -> None:
        """The round ended (finished, failed or cancelled, at any stage): the next one may go."""
        if turn in self._turns:
            self._turns.remove(turn)
        self._notify()

    def _may_run(self, turn: Turn) -> bool:
        if any(other.running for other in self._turns):
            return False
        for other in self._turns:
            if other is turn:
                return True
            if other.released:
                return False
        raise RuntimeError("a round waits for its turn after it left the line")

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()
