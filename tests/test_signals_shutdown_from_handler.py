"""A signal handler that calls shutdown() while the main thread is already in shutdown() of the same object (e.g. a
SIGTERM handler of a training script, and a shutdown() in its finally: block)."""

import contextlib
import os
import signal
import threading
import time

import pytest
import torch

from hivemind.averaging import DecentralizedAverager
from hivemind.dht import DHT
from hivemind.moe import ModuleBackend, Server
from hivemind.utils.process_handle import stop_lock
from hivemind.utils.tensor_descr import BatchTensorDescriptor

LOCALHOST = dict(host_maddrs=["/ip4/127.0.0.1/tcp/0"])


@contextlib.contextmanager
def _signalled_once_shutdown_holds_its_lock(handle, entered: list):
    """Inside: once the main thread holds the stop lock of ``handle`` (it is inside shutdown()), send it SIGUSR1 until
    its handler has started. On exit, no signal is sent any more (the test's handler may be uninstalled after it).

    One signal is not enough: one that arrives while the main thread is on its way into a wait (after Python last
    checked for signals, before the wait began) runs its handler only when that wait ends, after shutdown_timeout.
    """
    lock, main, done = stop_lock(handle), threading.main_thread().ident, threading.Event()

    def signal_main() -> None:
        while not done.is_set():
            if not lock.acquire(blocking=False):  # the main thread is inside shutdown()
                while not entered and not done.is_set():
                    signal.pthread_kill(main, signal.SIGUSR1)
                    time.sleep(0.05)
                return
            lock.release()
            time.sleep(0.001)

    signaller = threading.Thread(target=signal_main, daemon=True)
    signaller.start()
    try:
        yield
    finally:
        done.set()
        signaller.join()


def _shut_down_from_a_handler_during_shutdown(make_handle) -> None:
    dht = DHT(start=True, **LOCALHOST)
    handle = make_handle(dht)
    entered, handled = [], []

    def handler(signum, frame):
        if entered:
            return  # (a signal sent again before the first one was handled)
        entered.append(signum)
        os.kill(handle.pid, signal.SIGCONT)
        handle.shutdown()  # waited forever for the shutdown() that it interrupted
        handled.append(signum)

    previous = signal.signal(signal.SIGUSR1, handler)
    try:
        os.kill(handle.pid, signal.SIGSTOP)  # its shutdown() waits for it (up to shutdown_timeout) meanwhile
        with _signalled_once_shutdown_holds_its_lock(handle, entered):
            started = time.monotonic()
            handle.shutdown()
            assert time.monotonic() - started < 8
    finally:
        signal.signal(signal.SIGUSR1, previous)
        with contextlib.suppress(ProcessLookupError):  # (it was reaped: nothing to resume)
            os.kill(handle.pid, signal.SIGCONT)
        dht.shutdown()
    assert handled == [signal.SIGUSR1]
    assert not handle.is_alive() and handle.exitcode == 0, handle.exitcode


@pytest.mark.timeout(30)
def test_dht_shutdown_from_a_signal_handler_during_its_shutdown_returns():
    _shut_down_from_a_handler_during_shutdown(lambda dht: DHT(start=True, shutdown_timeout=10, **LOCALHOST))


@pytest.mark.timeout(30)
def test_averager_shutdown_from_a_signal_handler_during_its_shutdown_returns():
    _shut_down_from_a_handler_during_shutdown(
        lambda dht: DecentralizedAverager([torch.zeros(3)], dht, prefix="handler", start=True, shutdown_timeout=10)
    )


@pytest.mark.timeout(60)
def test_server_shutdown_from_a_signal_handler_during_its_shutdown_returns():
    schema = (BatchTensorDescriptor(4),)
    backends = {"ffn.0": ModuleBackend("ffn.0", torch.nn.Linear(4, 4), args_schema=schema, max_batch_size=8)}
    server = Server(DHT(start=True, **LOCALHOST), backends, start=True)
    entered, handled = [], []

    def handler(signum, frame):
        if entered:
            return  # (a signal sent again before the first one was handled)
        entered.append(signum)
        os.kill(server.dht.pid, signal.SIGCONT)
        server.shutdown()  # waited forever for the shutdown() that it interrupted
        handled.append(signum)

    previous = signal.signal(signal.SIGUSR1, handler)
    try:
        os.kill(server.dht.pid, signal.SIGSTOP)  # the server's shutdown() waits for its DHT (the last part) meanwhile
        # (signalled there: the handler then finds every other part stopped, and must get past the server's own lock)
        with _signalled_once_shutdown_holds_its_lock(server.dht, entered):
            started = time.monotonic()
            server.shutdown()
            assert time.monotonic() - started < 8
    finally:
        signal.signal(signal.SIGUSR1, previous)
        with contextlib.suppress(ProcessLookupError):
            os.kill(server.dht.pid, signal.SIGCONT)
        server.shutdown()
    assert handled == [signal.SIGUSR1]
    assert not server.dht.is_alive() and not server.is_alive()
