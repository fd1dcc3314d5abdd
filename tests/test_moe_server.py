"""Server with real ModuleBackends, Runtime and p2pd daemons: start / stop, remote results, bad requests."""

import concurrent.futures
import os
import subprocess
import sys
import threading

import psutil
import pytest
import torch

from hivemind.dht import DHT
from hivemind.moe.client.expert import RemoteExpert
from hivemind.moe.expert_uid import ExpertInfo
from hivemind.moe.server.dht_handler import get_experts
from hivemind.moe.server.module_backend import ModuleBackend
from hivemind.moe.server.server import Server
from hivemind.p2p import P2PHandlerError
from hivemind.utils.tensor_descr import BatchTensorDescriptor

HIDDEN = 16
MAX_BATCH = 64


def make_backends(uids, optimizer_lr=None):
    backends = {}
    for uid in uids:
        torch.manual_seed(len(backends))
        module = torch.nn.Sequential(torch.nn.Linear(HIDDEN, HIDDEN), torch.nn.Tanh())
        optimizer = torch.optim.SGD(module.parameters(), lr=optimizer_lr) if optimizer_lr else None
        backends[uid] = ModuleBackend(
            uid,
            module,
            optimizer=optimizer,
            args_schema=(BatchTensorDescriptor(HIDDEN),),
            outputs_schema=BatchTensorDescriptor(HIDDEN),
            max_batch_size=MAX_BATCH,
        )
    return backends


@pytest.fixture
def running_server():
    """(server, client DHT): a Server with two experts started in the background, and a DHT that knows it."""
    backends = make_backends(["expert.0", "expert.1"])
    server = Server(DHT(start=True), backends, update_period=10, start=True)
    client_dht = DHT(initial_peers=server.dht.get_visible_maddrs(), start=True)
    try:
        yield server, client_dht
    finally:
        client_dht.shutdown()
        server.shutdown()


def remote_expert(server: Server, client_dht: DHT, uid: str) -> RemoteExpert:
    (expert,) = get_experts(client_dht, [uid])
    assert expert is not None, f"{uid} is not announced"
    return expert


@pytest.mark.timeout(60)
def test_remote_forward_and_backward_equal_local(running_server):
    server, client_dht = running_server
    expert = remote_expert(server, client_dht, "expert.0")
    local = server.module_backends["expert.0"].module
    x = torch.randn(5, HIDDEN, requires_grad=True)
    x_local = x.detach().clone().requires_grad_(True)

    output = expert(x)
    output.sum().backward()
    local(x_local).sum().backward()
    assert torch.allclose(output, local(x_local), atol=1e-6)
    assert torch.allclose(x.grad, x_local.grad, atol=1e-6)


@pytest.mark.timeout(60)
def test_backward_trains_the_remote_expert():
    backends = make_backends(["expert.0"], optimizer_lr=0.5)
    before = [p.detach().clone() for p in backends["expert.0"].module.parameters()]
    server = Server(DHT(start=True), backends, start=True)
    client_dht = DHT(initial_peers=server.dht.get_visible_maddrs(), start=True)
    try:
        expert = remote_expert(server, client_dht, "expert.0")
        expert(torch.randn(4, HIDDEN, requires_grad=True)).pow(2).sum().backward()
        after = list(backends["expert.0"].module.parameters())
        assert any(not torch.equal(b, a.detach()) for b, a in zip(before, after))
    finally:
        client_dht.shutdown()
        server.shutdown()


@pytest.mark.timeout(60)
def test_info_reaches_the_client(running_server):
    server, client_dht = running_server
    info = remote_expert(server, client_dht, "expert.1").info
    assert info["forward_schema"] == ((BatchTensorDescriptor(HIDDEN),), {})
    assert info["outputs_schema"] == BatchTensorDescriptor(HIDDEN)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "inputs, expected_text",
    [
        (torch.randn(3, HIDDEN + 1), "shape"),
        (torch.randn(0, HIDDEN), "empty"),
        (torch.randn(MAX_BATCH + 1, HIDDEN), "max_batch_size"),
        (torch.randn(3, HIDDEN, dtype=torch.float64), "dtype"),
    ],
    ids=["wrong width", "empty batch", "over max_batch_size", "wrong dtype"],
)
def test_bad_inputs_fail_clearly_and_server_keeps_serving(running_server, inputs, expected_text):
    server, client_dht = running_server
    expert = remote_expert(server, client_dht, "expert.0")
    expert.info  # noqa: B018 (fetch the schema first)

    stub_call = _raw_forward(expert, inputs)
    with pytest.raises(P2PHandlerError, match=expected_text):
        stub_call.result(timeout=30)
    assert expert(torch.randn(2, HIDDEN)).shape == (2, HIDDEN)


def _raw_forward(expert: RemoteExpert, tensor: torch.Tensor) -> concurrent.futures.Future:
    """Send a forward request as it is, without the client's own checks."""
    from hivemind.compression import serialize_torch_tensor
    from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker
    from hivemind.proto import runtime_pb2

    request = runtime_pb2.ExpertRequest(uid=expert.uid, tensors=[serialize_torch_tensor(tensor)])
    return RemoteExpertWorker.run_coroutine(expert.stub.rpc_forward(request, timeout=30), return_future=True)


@pytest.mark.timeout(60)
def test_unknown_uid_fails_clearly(running_server):
    server, client_dht = running_server
    expert = RemoteExpert(
        ExpertInfo("expert.404", server.dht.peer_id), remote_expert(server, client_dht, "expert.0").p2p
    )
    with pytest.raises(P2PHandlerError, match="unknown expert uid"):
        expert.info  # noqa: B018


@pytest.mark.timeout(60)
def test_malformed_request_never_fails_concurrent_good_ones(running_server):
    server, client_dht = running_server
    expert = remote_expert(server, client_dht, "expert.0")
    good_inputs = [torch.randn(4, HIDDEN) for _ in range(16)]
    with concurrent.futures.ThreadPoolExecutor(8) as executor:
        good = [executor.submit(expert, x) for x in good_inputs[:8]]
        bad = _raw_forward(expert, torch.randn(4, HIDDEN + 2))
        good += [executor.submit(expert, x) for x in good_inputs[8:]]
        outputs = [future.result(timeout=30) for future in good]
    with pytest.raises(P2PHandlerError):
        bad.result(timeout=30)
    local = server.module_backends["expert.0"].module
    for x, output in zip(good_inputs, outputs):
        assert torch.allclose(output, local(x), atol=1e-6)


@pytest.mark.timeout(60)
def test_shutdown_leaves_no_thread_or_process():
    threads_before = set(threading.enumerate())
    children_before = {child.pid for child in psutil.Process().children(recursive=True)}
    server = Server(DHT(start=True), make_backends(["expert.0"]), start=True)
    assert server.ready.is_set()
    server.shutdown()
    assert not server.is_alive() and not server.ready.is_set()
    leftover_threads = [t for t in threading.enumerate() if t not in threads_before and t.is_alive()]
    leftover_threads = [t for t in leftover_threads if not t.name.startswith(("MPFuture", "RemoteExpertWorker"))]
    assert leftover_threads == []
    children = [c for c in psutil.Process().children(recursive=True) if c.pid not in children_before]
    assert [c for c in children if c.status() != psutil.STATUS_ZOMBIE] == []


@pytest.mark.timeout(60)
def test_handler_processes_serve_too():
    server = Server(DHT(start=True), make_backends(["expert.0"]), num_connection_handlers=2, handler_processes=True)
    server.run_in_background(await_ready=True, timeout=30)
    client_dht = DHT(initial_peers=server.dht.get_visible_maddrs(), start=True)
    try:
        expert = remote_expert(server, client_dht, "expert.0")
        x = torch.randn(3, HIDDEN)
        assert torch.allclose(expert(x), server.module_backends["expert.0"].module(x), atol=1e-6)
        assert all(handler.pid != os.getpid() and handler.is_alive() for handler in server.conn_handlers)
    finally:
        client_dht.shutdown()
        server.shutdown()
    assert not any(handler.is_alive() for handler in server.conn_handlers)


SPAWNED_HANDLERS_SCRIPT = """
import multiprocessing as mp
import torch
from hivemind.dht import DHT
from hivemind.moe.server import ConnectionHandler, Server
from hivemind.moe.server.dht_handler import get_experts

if __name__ == "__main__":
    mp.set_start_method("spawn")
    server = Server.create(expert_uids=["ffn.0"], hidden_dim=8, device="cpu", host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                           start=False)
    server.handler_processes = True
    server.conn_handlers = [ConnectionHandler(server.dht, server.module_backends)]
    server.run_in_background(timeout=120)
    try:
        with DHT(initial_peers=server.dht.get_visible_maddrs(), start=True) as client:
            (expert,) = get_experts(client, ["ffn.0"])
            x = torch.randn(3, 8)
            assert torch.allclose(expert(x), server.module_backends["ffn.0"].module(x), atol=1e-5)
    finally:
        server.shutdown()
    assert not any(handler.is_alive() for handler in server.conn_handlers)
    print("served from spawned handlers")
"""


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_handler_processes_work_under_spawn(tmp_path):
    script = tmp_path / "spawned_handlers.py"
    script.write_text(SPAWNED_HANDLERS_SCRIPT)
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=280)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "served from spawned handlers" in result.stdout


class BrokenHandler:
    """A connection handler whose start fails (as a handler that cannot reach the DHT's daemon would)."""

    def run_in_thread(self, await_ready=True, timeout=None):
        raise OSError("no route to the p2p daemon")

    def is_alive(self):
        return False

    def shutdown(self):
        pass


@pytest.mark.timeout(60)
def test_failed_start_raises_and_stops_what_started():
    server = Server(DHT(start=True), make_backends(["expert.0"]))
    server.conn_handlers = [BrokenHandler()]
    with pytest.raises(RuntimeError, match="no route to the p2p daemon"):
        server.run_in_background(timeout=30)
    assert not server.dht_handler_thread.is_alive()
    assert not server.dht.is_alive()
