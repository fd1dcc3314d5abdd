"""A Server shut down while its thread is still starting (e.g. ``start()`` followed at once by ``shutdown()``, or
``shutdown()`` after ``run_in_background(timeout=...)`` raised TimeoutError) starts nothing after ``shutdown()`` began:
no DHT process or p2pd, handler or announcement thread runs on once ``shutdown()`` returned."""

import threading

import psutil
import pytest
import torch

from hivemind.dht import DHT
from hivemind.moe.server import ModuleBackend, Server
from hivemind.utils.tensor_descr import BatchTensorDescriptor

HIDDEN = 4
PAUSE_LIMIT = 10  # seconds; the pause ends as soon as shutdown() stopped the DHT


class PausingLinear(torch.nn.Linear):
    """Listing its parameters in the server's thread (run() does so first) waits until ``resume`` is set."""

    def __init__(self):
        super().__init__(HIDDEN, HIDDEN)
        self.resume = threading.Event()
        self.paused = threading.Event()

    def parameters(self, recurse: bool = True):
        if threading.current_thread().name == "hivemind.moe.Server":
            self.paused.set()
            self.resume.wait(PAUSE_LIMIT)
        return super().parameters(recurse)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("handler_processes", [False, True])
def test_server_shut_down_while_starting_leaves_nothing_running(handler_processes):
    module = PausingLinear()
    backend = ModuleBackend(
        "expert.0",
        module,
        args_schema=(BatchTensorDescriptor(HIDDEN),),
        outputs_schema=BatchTensorDescriptor(HIDDEN),
        max_batch_size=8,
    )
    children_before = {child.pid for child in psutil.Process().children(recursive=True)}  # (other tests')
    dht = DHT(start=False, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    stop_dht = dht.shutdown

    def shutdown_dht_then_resume():  # the server's thread goes on once shutdown() went past the DHT
        stop_dht()
        module.resume.set()

    dht.shutdown = shutdown_dht_then_resume
    server = Server(dht, {"expert.0": backend}, handler_processes=handler_processes)
    server.run_in_background(await_ready=False)
    assert module.paused.wait(PAUSE_LIMIT)
    try:
        server.shutdown()
        assert not server.is_alive()
        assert not dht.is_alive(), "the DHT process was started after shutdown() and runs on"
        assert not any(handler.is_alive() for handler in server.conn_handlers), "a handler serves after shutdown()"
        assert not server.dht_handler_thread.is_alive()
        new_children = [c for c in psutil.Process().children(recursive=True) if c.pid not in children_before]
        assert new_children == []
    finally:
        for handler in server.conn_handlers:
            handler.shutdown()
        server.dht_handler_thread.shutdown()
        stop_dht()
