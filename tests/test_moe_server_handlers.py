"""Where a Server answers expert calls: one handler thread by default, or num_handlers handler processes."""

import os
import socket
import struct

import pytest
import torch

from hivemind.dht import DHT
from hivemind.moe.server import Server, task_pool_ipc
from hivemind.moe.server.dht_handler import get_experts

LOOPBACK = dict(host_maddrs=["/ip4/127.0.0.1/tcp/0"], device="cpu")


def _pids_sending_tasks_to_this_process() -> set:
    """Pids of the processes connected to this process's task-pool hub (tasks of handler processes arrive there)."""
    hub = task_pool_ipc._hub
    if hub is None or hub.pid != os.getpid():
        return set()
    credentials = struct.Struct("3i")
    pids = set()
    for channel in list(hub.channels):
        try:
            pid, _, _ = credentials.unpack(
                channel.sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, credentials.size)
            )
        except OSError:
            continue
        pids.add(pid)
    return pids


@pytest.mark.timeout(120)
def test_num_handlers_starts_that_many_handler_processes_and_they_serve_the_calls():
    server = Server.create(expert_uids=["ffn.0"], hidden_dim=8, num_handlers=3, start=True, **LOOPBACK)
    client_dht = DHT(initial_peers=server.dht.get_visible_maddrs(), start=True)
    try:
        handler_pids = {handler.pid for handler in server.conn_handlers}
        assert len(server.conn_handlers) == 3 and len(handler_pids) == 3 and os.getpid() not in handler_pids
        assert all(handler.is_alive() and handler._thread is None for handler in server.conn_handlers)

        (expert,) = get_experts(client_dht, ["ffn.0"])
        local = server.module_backends["ffn.0"].module
        for _ in range(6):  # the daemon hands a protocol's calls to its balanced handlers in turn
            x = torch.randn(2, 8)
            assert torch.allclose(expert(x), local(x), atol=1e-5)
        assert handler_pids <= _pids_sending_tasks_to_this_process()
    finally:
        client_dht.shutdown()
        server.shutdown()
    assert not any(handler.is_alive() for handler in server.conn_handlers)


@pytest.mark.timeout(60)
def test_by_default_one_handler_thread_serves_in_the_server_process():
    server = Server.create(expert_uids=["ffn.0"], hidden_dim=8, start=True, **LOOPBACK)
    try:
        (handler,) = server.conn_handlers
        assert handler._thread is not None and handler._thread.is_alive() and handler.pid is None
    finally:
        server.shutdown()


def test_num_connection_handlers_below_one_is_refused():
    with pytest.raises(ValueError, match="num_connection_handlers must be at least 1"):
        Server(DHT(start=False), {}, num_connection_handlers=0)
