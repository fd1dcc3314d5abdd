"""Shutting an averager down while its process adds a round's result to the tensors leaves the tensors' lock free:
the process lets that work finish before it exits, so that ``get_tensors()`` in the user's process never blocks
forever on a lock held by a thread that no longer exists."""

import multiprocessing as mp
import time

import pytest
import torch
from averager_helpers import FAST, dht_swarm

from hivemind.averaging.averager import DecentralizedAverager

APPLYING = mp.get_context("fork").Event()  # set in an averager's process


class SlowToApply(DecentralizedAverager):
    def _apply_deltas(self, deltas):
        with self.lock_averaged_tensors:  # e.g. a large model's tensors take this long
            APPLYING.set()
            time.sleep(1.0)
        super()._apply_deltas(deltas)


@pytest.mark.timeout(60)
def test_shutdown_while_deltas_are_applied_leaves_the_tensors_lock_free():
    with dht_swarm(2) as dhts:
        options = dict(prefix="apply", start=True, target_group_size=2, shutdown_timeout=10, **FAST)
        options.update(start_method="fork")  # APPLYING reaches the averagers' processes as they are forked
        slow = SlowToApply([torch.zeros(10)], dhts[0], **options)
        other = SlowToApply([torch.ones(10)], dhts[1], **options)  # (peers call handlers named by their class)
        try:
            for averager in (slow, other):
                averager.step(wait=False, timeout=30)
            assert APPLYING.wait(30)
            slow.shutdown()
            assert slow.lock_averaged_tensors.acquire(timeout=5), "the lock died with the averager's process"
            slow.lock_averaged_tensors.release()
        finally:
            slow.shutdown()
            other.shutdown()
