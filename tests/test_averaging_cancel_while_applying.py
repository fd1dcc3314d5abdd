"""A step cancelled while its round's result is being added to the tensors (in a thread) ends only once that thread
is done: it used to end at once, so the next round (free to start when this one left its turn) read tensors that the
thread was still moving, and computed its deltas from half-old values."""

import asyncio
import threading

import pytest
import torch

from hivemind.averaging.averager_rounds import AveragingRounds

pytestmark = pytest.mark.timeout(20)


class _Host(AveragingRounds):
    def __init__(self):
        self.entered, self.release, self.applied = threading.Event(), threading.Event(), threading.Event()

    def _apply_deltas(self, deltas):
        self.entered.set()
        self.release.wait(10)
        self.applied.set()


async def test_a_cancellation_while_applying_waits_for_the_thread():
    host = _Host()
    task = asyncio.create_task(host._apply_in_thread([torch.ones(4)]))
    await asyncio.get_running_loop().run_in_executor(None, host.entered.wait, 10)
    task.cancel()
    await asyncio.sleep(0.2)
    assert not task.done(), "the step ended while its deltas were still being added"
    host.release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert host.applied.is_set()


async def test_applying_without_cancellation_returns_after_the_thread():
    host = _Host()
    host.release.set()
    await asyncio.wait_for(host._apply_in_thread([torch.ones(4)]), 10)
    assert host.applied.is_set()
