"""How a sender tells a reducer that is slow from one that has stalled: when its stream to that reducer last moved."""

import asyncio

__all__ = ["SendProgress"]


class SendProgress:
    """When a sender's stream to one reducer last moved (a part handed to it or a reply received), and how long it
    may stay still before the reducer is taken for a stalled one.

    :param first_reply_factor: a sender with no share of its own gets its first reply only after the reducer has
      averaged every part it may still hold, so once all its parts are sent it waits this many reducer timeouts for
      that reply (one per window of parts). Not before: a reducer that takes none of its parts for one reducer
      timeout has stalled (it waited one per window for a frozen reducer, 39 s where the others took 10 s)
    """

    __slots__ = ("last", "replied", "sent", "sent_all", "first_reply_factor")

    def __init__(self, first_reply_factor: int = 1):
        self.last = asyncio.get_running_loop().time()
        self.replied = self.sent_all = False
        self.sent = 0  # parts handed to the stream
        self.first_reply_factor = first_reply_factor

    def touch(self, reply: bool = False) -> None:
        self.last = asyncio.get_running_loop().time()
        self.replied = self.replied or reply

    def limit(self, reducer_timeout: float) -> float:
        """Seconds the stream may stay still from ``last`` on."""
        waiting_first_reply = self.sent_all and not self.replied
        return reducer_timeout * (self.first_reply_factor if waiting_first_reply else 1)
