"""A future collected by the garbage collector while its own thread allocates a slot (the collector may run inside
allocate()) frees its slot without deadlocking that thread."""

import os
import threading

import pytest

from hivemind.utils.shared_slots import Segment


@pytest.mark.timeout(30)
def test_a_slot_released_while_allocate_holds_the_segment_lock_does_not_deadlock():
    segment = Segment()
    slot = segment.allocate(uid=1)

    def release_from_inside_allocate():
        with segment._lock:  # where allocate() is when the collector runs a future's finalizer in the same thread
            segment.release(slot, os.getpid())

    thread = threading.Thread(target=release_from_inside_allocate, daemon=True)
    thread.start()
    thread.join(timeout=5)
    assert not thread.is_alive(), "release() deadlocked on the lock its own thread holds"  # before: hung forever
    reused = [segment.allocate(uid) for uid in range(2, 2 + 1024)]
    assert slot in reused and None not in reused  # the freed slot is handed out again: all 1024 slots are free
    assert segment.allocate(uid=5000) is None


@pytest.mark.timeout(60)
def test_futures_created_and_collected_in_many_threads_keep_working():
    from hivemind.utils.mpfuture import MPFuture

    def churn():
        for _ in range(3000):
            future = MPFuture()
            future.set_result(1)
            assert future.result() == 1

    threads = [threading.Thread(target=churn, daemon=True) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=50)
    assert not any(thread.is_alive() for thread in threads)
