"""first_to_start (hedged start of state downloads): a caller cancelled while the losers of a race are being
stopped still closes every download that had started (fake downloads, as in test_averaging_state_hedge_race)."""

import asyncio

from test_averaging_state_hedge_race import FakeDownload

from hivemind.averaging.state_hedge import first_to_start


class SlowToStop(FakeDownload):
    """Never starts; once cancelled, takes a while to let go (as a stream that is closed with the daemon's help)."""

    def __init__(self, name: str):
        super().__init__(name, 0.0)
        self.stopping = asyncio.Event()

    async def start(self) -> None:
        self.asked_at = asyncio.get_running_loop().time()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.stopping.set()
            await asyncio.sleep(0.2)
            raise


async def test_caller_cancelled_while_losers_stop_still_closes_the_one_that_started_with_the_winner():
    go = asyncio.Event()
    downloads = {"better": FakeDownload("better", 0.0, go=go), "tied": FakeDownload("tied", 0.0, go=go)}
    downloads["slow"] = SlowToStop("slow")
    task = asyncio.create_task(first_to_start(list(downloads), downloads.__getitem__, hedge_delay=0.01))
    await asyncio.wait_for(wait_asked(downloads["slow"]), timeout=5)
    go.set()  # "better" and "tied" start in the same turn; "better" wins and the others are stopped
    await asyncio.wait_for(downloads["slow"].stopping.wait(), timeout=5)
    task.cancel()  # the caller is cancelled while "slow" still unwinds
    await asyncio.gather(task, return_exceptions=True)
    assert task.cancelled()
    assert downloads["better"].closed  # (the winner, never handed out)
    assert downloads["tied"].closed, "a download that had started was left open"


async def wait_asked(download: FakeDownload) -> None:
    while download.asked_at is None:
        await asyncio.sleep(0.01)
