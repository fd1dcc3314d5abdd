"""The pending calls of a channel are failed by two threads at once when a DHT or averager is shut down: the reader
thread, which sees the pipe close as the process exits, and shutdown() itself. Each pending call must be failed once,
by either, and neither thread may crash: one that found a call pending and then lost it to the other raised
KeyError (from shutdown(), which then skipped the rest of its clean-up, e.g. failing the averager's running steps)."""

import concurrent.futures
import threading
from multiprocessing import Pipe

import pytest

from hivemind.dht.process_channel import CallerEnd, ChannelClosedError


class _LosesItsLastCallToAnotherThread(dict):
    """Pauses ``paused_thread`` just before its first ``popitem()`` until ``resume`` is set."""

    def __init__(self, *args):
        super().__init__(*args)
        self.paused_thread = None
        self.about_to_pop, self.resume = threading.Event(), threading.Event()

    def popitem(self):
        if threading.current_thread() is self.paused_thread and not self.about_to_pop.is_set():
            self.about_to_pop.set()
            assert self.resume.wait(10)
        return super().popitem()


@pytest.mark.timeout(30)
def test_reader_thread_and_shutdown_failing_the_same_calls_each_fail_them_once_without_crashing(monkeypatch):
    crashes = []
    monkeypatch.setattr(threading, "excepthook", lambda args: crashes.append(args.exc_value))
    ours, theirs = Pipe(duplex=True)
    caller = CallerEnd(ours, "DHT")
    caller.ready.set_result(None)
    caller._pending = pending = _LosesItsLastCallToAnotherThread(caller._pending)
    future = caller.call(concurrent.futures.Future(), "run_coroutine")
    assert future in pending.values()

    caller.start_reader()
    pending.paused_thread = caller._reader
    theirs.close()  # the process exits: its end of the pipe closes, and the reader thread fails the pending calls
    assert pending.about_to_pop.wait(10)
    caller.close()  # meanwhile, shutdown() fails them too
    caller.fail_pending(RuntimeError("DHT was shut down"))
    pending.resume.set()
    caller._reader.join(10)

    assert not caller._reader.is_alive()
    assert crashes == []
    with pytest.raises(ChannelClosedError):
        future.result(timeout=0)
    assert not pending
