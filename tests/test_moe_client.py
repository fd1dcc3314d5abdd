"""RemoteExpert against a real expert RPC server (through p2pd daemons on 127.0.0.1)."""

import os

import pytest
import torch
import torch.nn as nn
from moe_client_fakes import FakeExpertServer

from hivemind.dht import DHT
from hivemind.moe.client.expert import RemoteExpert
from hivemind.moe.client.expert_rpc import MAX_UNARY_PAYLOAD_SIZE, ExpertResponseTooLarge
from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker
from hivemind.moe.expert_uid import ExpertInfo
from hivemind.moe.server.dht_handler import get_experts
from hivemind.p2p import P2PHandlerError

HID = 16


@pytest.fixture(scope="module")
def shared_server_and_client():
    torch.manual_seed(0)
    modules = {"expert.0": nn.Sequential(nn.Linear(HID, 32), nn.Tanh(), nn.Linear(32, HID))}
    server = FakeExpertServer(modules, HID)
    client_dht = DHT(start=True, initial_peers=server.dht.get_visible_maddrs(), host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    try:
        yield server, client_dht
    finally:
        client_dht.shutdown()
        server.stop()


@pytest.fixture
def server_and_client(shared_server_and_client):
    """A fake expert server of `expert.0` (no faults, no recorded calls) and a client DHT, shared by this module."""
    shared_server_and_client[0].handler.reset_faults()
    yield shared_server_and_client
    shared_server_and_client[0].handler.reset_faults()


def _remote(server, client_dht, uid="expert.0") -> RemoteExpert:
    p2p = RemoteExpertWorker.run_coroutine(client_dht.replicate_p2p())
    return RemoteExpert(ExpertInfo(uid, server.dht.peer_id), p2p)


def _remote_and_local(server_and_client, batch_size: int):
    """(remote expert.0, its local module, inputs that need gradients, an independent copy of them for the module)."""
    server, client_dht = server_and_client
    inputs = torch.randn(batch_size, HID, requires_grad=True)
    local_inputs = inputs.detach().clone().requires_grad_(True)
    return _remote(server, client_dht), server.handler.modules["expert.0"], inputs, local_inputs


@pytest.mark.parametrize("batch_size", [4, MAX_UNARY_PAYLOAD_SIZE // (4 * HID) + 1], ids=["unary", "streaming"])
def test_forward_and_backward_equal_the_local_module(server_and_client, batch_size):
    expert, local, inputs, local_inputs = _remote_and_local(server_and_client, batch_size)

    output = expert(inputs)
    (output * torch.arange(HID)).sum().backward()
    local_output = local(local_inputs)
    (local_output * torch.arange(HID)).sum().backward()

    assert torch.allclose(output, local_output, atol=1e-5)
    assert torch.allclose(inputs.grad, local_inputs.grad, atol=1e-5)
    used_stream = "stream:expert.0" in server_and_client[0].handler.calls
    assert used_stream == (batch_size * HID * 4 > MAX_UNARY_PAYLOAD_SIZE)


def test_info_is_fetched_once_and_cached(server_and_client):
    server, client_dht = server_and_client
    expert = _remote(server, client_dht)
    for _ in range(3):
        expert(torch.randn(2, HID))
    assert expert.info["keyword_names"] == ()
    assert len(server.handler.calls["info:expert.0"]) == 1


@pytest.mark.parametrize("batch_size", [4, MAX_UNARY_PAYLOAD_SIZE // (4 * HID) + 1], ids=["unary", "streaming"])
def test_outputs_are_own_cpu_tensors_that_later_calls_leave_alone(server_and_client, batch_size):
    """Outputs may be read straight from received bytes: never from a buffer that a later answer reuses."""
    server, client_dht = server_and_client
    expert, local = _remote(server, client_dht), server.handler.modules["expert.0"]
    first_input, second_input = torch.randn(batch_size, HID), torch.randn(batch_size, HID)
    first = expert(first_input)
    expected_first = local(first_input).detach()
    second = expert(second_input)
    assert first.device == second.device == torch.device("cpu") and first.shape == (batch_size, HID)
    assert torch.allclose(first, expected_first, atol=1e-5)
    assert torch.allclose(second, local(second_input), atol=1e-5)
    assert first.data_ptr() != second.data_ptr()


@pytest.mark.parametrize("batch_size", [4, MAX_UNARY_PAYLOAD_SIZE // (4 * HID) + 1], ids=["unary", "streaming"])
def test_outputs_can_be_changed_in_place_and_still_backpropagate(server_and_client, batch_size):
    expert, local, inputs, local_inputs = _remote_and_local(server_and_client, batch_size)
    output = expert(inputs)
    output += 1.0  # e.g. a residual added in place
    output.mul_(2.0).sum().backward()
    local_output = (local(local_inputs) + 1.0) * 2.0
    local_output.sum().backward()
    assert torch.allclose(output, local_output, atol=1e-5)
    assert torch.allclose(inputs.grad, local_inputs.grad, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device for the inputs")
def test_outputs_of_cuda_inputs_are_cpu_tensors(server_and_client):
    server, client_dht = server_and_client
    output = _remote(server, client_dht)(torch.randn(3, HID, device="cuda"))
    assert output.device == torch.device("cpu") and output.shape == (3, HID)


def test_wrong_argument_structure_raises_type_error(server_and_client):
    server, client_dht = server_and_client
    expert = _remote(server, client_dht)
    with pytest.raises(TypeError):
        expert(torch.randn(2, HID), torch.randn(2, HID))
    with pytest.raises(AssertionError):
        expert(torch.randn(2, HID), extra=torch.randn(2, HID))


def test_server_errors_arrive_as_handler_errors(server_and_client):
    server, client_dht = server_and_client
    with pytest.raises(P2PHandlerError, match="unknown expert"):
        _ = _remote(server, client_dht, uid="expert.99").info


def test_get_experts_returns_remote_experts_aligned_with_uids(server_and_client):
    server, client_dht = server_and_client
    found = get_experts(client_dht, ["expert.0", "expert.1"])
    assert found[1] is None
    assert found[0].uid == "expert.0" and found[0].peer_id == server.dht.peer_id
    assert found[0](torch.ones(1, HID)).shape == (1, HID)


@pytest.mark.timeout(30)
def test_worker_runs_coroutines_in_a_forked_child():
    async def pid():
        return os.getpid()

    assert RemoteExpertWorker.run_coroutine(pid()) == os.getpid()  # the parent's loop thread exists
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        try:
            ok = RemoteExpertWorker.run_coroutine(pid()) == os.getpid()
            os.write(write_end, b"1" if ok else b"0")
        finally:
            os._exit(0)
    os.close(write_end)
    assert os.read(read_end, 1) == b"1"
    os.waitpid(child, 0)
    os.close(read_end)


@pytest.mark.parametrize("batch_size", [4, MAX_UNARY_PAYLOAD_SIZE // (4 * HID) + 1], ids=["unary", "streaming"])
def test_an_answer_larger_than_the_request_can_need_is_refused(server_and_client, batch_size):
    server, client_dht = server_and_client
    server.handler.oversized.add("expert.0")
    with pytest.raises(ExpertResponseTooLarge, match="expert.0 answered with over"):
        _remote(server, client_dht)(torch.randn(batch_size, HID))
