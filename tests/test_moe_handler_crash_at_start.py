"""A connection handler process that dies while starting fails the server's start-up instead of hanging it."""

import os

import pytest
import torch

from hivemind.dht import DHT
from hivemind.moe.server import ConnectionHandler, Server
from hivemind.moe.server.module_backend import ModuleBackend
from hivemind.utils.tensor_descr import BatchTensorDescriptor


class DiesAtStart(ConnectionHandler):
    def run(self):  # e.g. killed by the OOM killer, or a crash in a native library, before serving
        os._exit(3)


@pytest.mark.timeout(30)
def test_handler_process_that_dies_before_ready_is_an_error_with_its_exit_code():
    dht = DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    handler = DiesAtStart(dht, {})
    try:
        with pytest.raises(RuntimeError, match=r"DiesAtStart stopped before it was ready \(exit code 3\)"):
            handler.run_in_background(await_ready=True, timeout=20)
    finally:
        handler.shutdown()
        dht.shutdown()


@pytest.mark.timeout(60)
def test_server_whose_handler_process_dies_at_start_fails_to_start_and_stops_everything(monkeypatch):
    monkeypatch.setattr(ConnectionHandler, "run", DiesAtStart.run)  # (handler processes are forked from here)
    backend = ModuleBackend(
        "expert.0", torch.nn.Linear(2, 2), args_schema=(BatchTensorDescriptor(2),), max_batch_size=4
    )
    dht = DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    server = Server(dht, {"expert.0": backend}, num_connection_handlers=2)
    with pytest.raises(RuntimeError, match="stopped before it was ready"):
        server.run_in_background(await_ready=True, timeout=20)
    assert not any(handler.is_alive() for handler in server.conn_handlers)
    assert not server.is_alive() and not dht.is_alive()
