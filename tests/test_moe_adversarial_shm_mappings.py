"""Pipe mappings kept for reuse are shared by every event loop of a process: a server's connection handler thread and
the clients of the same process release theirs concurrently (seen as a KeyError escaping an event loop callback while
a hostile client cancelled requests en masse)."""

import mmap
import sys
import threading

import pytest

from hivemind.p2p.p2p_daemon_bindings import shm_pipe


@pytest.fixture
def fast_thread_switches():
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible, so that the race shows at once
    try:
        yield
    finally:
        sys.setswitchinterval(interval)


@pytest.mark.timeout(60)
def test_mappings_released_by_several_threads_at_once_raise_nothing(fast_thread_switches):
    errors = []

    def release_many(thread: int) -> None:
        try:
            for index in range(5000):  # files that are gone already: every call drops them all again
                shm_pipe._keep_mapping(f"/nonexistent/hivemind-test-{thread}-{index}", mmap.mmap(-1, mmap.PAGESIZE))
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=release_many, args=(thread,)) for thread in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, f"releasing mappings from several threads failed: {errors!r}"
