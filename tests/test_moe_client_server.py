"""RemoteExpert and RemoteMixtureOfExperts against the real server pieces (ModuleBackend, Runtime,
ConnectionHandler, DHTHandlerThread) over real daemons."""

import copy

import pytest
import torch
import torch.nn as nn

from hivemind.dht import DHT
from hivemind.moe import RemoteMixtureOfExperts, get_experts
from hivemind.moe.client.expert_rpc import MAX_UNARY_PAYLOAD_SIZE
from hivemind.moe.server.connection_handler import ConnectionHandler
from hivemind.moe.server.dht_handler import DHTHandlerThread
from hivemind.moe.server.module_backend import ModuleBackend
from hivemind.moe.server.runtime import Runtime
from hivemind.proto.runtime_pb2 import CompressionType
from hivemind.utils.tensor_descr import BatchTensorDescriptor

HID = 16


def make_module(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(HID, 2 * HID), nn.GELU(), nn.Linear(2 * HID, HID))


@pytest.fixture
def real_server():
    """(server dht, client dht, {uid: pristine copy of the hosted module}, {uid: backend})."""
    uids = ["ffn.0.0", "ffn.0.1", "ffn.1.0", "ffn.1.1"]
    modules = {uid: make_module(index) for index, uid in enumerate(uids)}
    pristine = {uid: copy.deepcopy(module) for uid, module in modules.items()}
    backends = {
        uid: ModuleBackend(uid, module, args_schema=(BatchTensorDescriptor(HID),), max_batch_size=65536)
        for uid, module in modules.items()
    }
    trained = make_module(99)
    backends["ffn.9.9"] = ModuleBackend(
        "ffn.9.9",
        trained,
        optimizer=torch.optim.SGD(trained.parameters(), lr=0.1),
        args_schema=(BatchTensorDescriptor(HID, compression=CompressionType.FLOAT16),),
        max_batch_size=4096,
    )
    server_dht = DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    runtime = Runtime(backends)
    runtime.start()
    handler = ConnectionHandler(server_dht, backends)
    handler.run_in_thread(await_ready=True, timeout=30)
    announcer = DHTHandlerThread(backends, server_dht, update_period=10)
    announcer.start()
    client_dht = DHT(start=True, initial_peers=server_dht.get_visible_maddrs(), host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    try:
        assert runtime.ready.wait(10)
        yield server_dht, client_dht, pristine, backends
    finally:
        client_dht.shutdown()
        announcer.shutdown()
        handler.shutdown()
        runtime.shutdown(timeout=10)
        server_dht.shutdown()


def _expert(client_dht, uid):
    (expert,) = get_experts(client_dht, [uid])
    assert expert is not None, f"{uid} is not declared"
    return expert


@pytest.mark.timeout(60)
@pytest.mark.parametrize("batch_size", [3, MAX_UNARY_PAYLOAD_SIZE // (4 * HID) + 5], ids=["unary", "streaming"])
def test_remote_expert_equals_the_local_module(real_server, batch_size):
    _, client_dht, pristine, _ = real_server
    expert, local = _expert(client_dht, "ffn.0.1"), pristine["ffn.0.1"]
    x = torch.randn(batch_size, HID, requires_grad=True)
    x_local = x.detach().clone().requires_grad_(True)
    output = expert(x)
    (output * output).sum().backward()
    local_output = local(x_local)
    (local_output * local_output).sum().backward()
    assert torch.allclose(output, local_output, atol=1e-5)
    assert torch.allclose(x.grad, x_local.grad, atol=1e-4)


def test_backward_trains_the_remote_expert(real_server):
    _, client_dht, _, backends = real_server
    expert = _expert(client_dht, "ffn.9.9")
    before = [p.detach().clone() for p in backends["ffn.9.9"].module.parameters()]
    x = torch.randn(4, HID, requires_grad=True)
    first = expert(x)
    first.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    after = list(backends["ffn.9.9"].module.parameters())
    assert any(not torch.equal(old, new) for old, new in zip(before, after))
    assert not torch.allclose(expert(x), first, atol=1e-6)  # the next forward uses the updated weights


def test_mixture_over_a_real_server_matches_the_local_mixture(real_server):
    _, client_dht, pristine, _ = real_server
    moe = RemoteMixtureOfExperts(in_features=HID, grid_size=(2, 2), dht=client_dht, uid_prefix="ffn.", k_best=4)
    x = torch.randn(5, HID)
    output = moe(x)
    scores = moe.proj(x).split_with_sizes((2, 2), dim=-1)
    expected = []
    for row in range(5):
        logits = torch.stack([scores[0][row, i] + scores[1][row, j] for i in range(2) for j in range(2)])
        weights = torch.softmax(logits, dim=0)
        outputs = [pristine[f"ffn.{i}.{j}"](x[row : row + 1])[0] for i in range(2) for j in range(2)]
        expected.append(sum(w * o for w, o in zip(weights, outputs)))
    assert torch.allclose(output, torch.stack(expected), atol=1e-5)


@pytest.mark.timeout(60)
def test_expert_with_an_integer_input_through_a_real_server():
    """det_dropout takes a float input and an integer mask: only the float input gets a gradient."""
    from hivemind.moe import Server

    server = Server.create(
        expert_uids=["drop.0"],
        expert_cls="det_dropout",
        hidden_dim=HID,
        optim_cls=None,
        start=True,
        host_maddrs=["/ip4/127.0.0.1/tcp/0"],
    )
    client_dht = DHT(start=True, initial_peers=server.dht.get_visible_maddrs(), host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    try:
        local = copy.deepcopy(server.module_backends["drop.0"].module)
        expert = _expert(client_dht, "drop.0")
        x, mask = torch.randn(6, HID, requires_grad=True), torch.randint(0, 2, (6, HID))
        x_local = x.detach().clone().requires_grad_(True)
        output = expert(x, mask)
        output.pow(2).sum().backward()
        local(x_local, mask).pow(2).sum().backward()
        assert torch.allclose(output, local(x_local, mask), atol=1e-5)
        assert torch.allclose(x.grad, x_local.grad, atol=1e-4)

        moe = RemoteMixtureOfExperts(in_features=HID, grid_size=(1,), dht=client_dht, uid_prefix="drop.", k_best=1)
        x.grad = None
        moe_output = moe(x, mask)
        moe_output.sum().backward()
        assert torch.allclose(moe_output, local(x, mask), atol=1e-5) and x.grad is not None
    finally:
        client_dht.shutdown()
        server.shutdown()
