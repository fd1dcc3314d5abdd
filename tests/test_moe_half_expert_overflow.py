"""A float16 expert whose parameter gradients overflow for one honest backward request (as happens now and then in
fp16 training: the update of that step is skipped, as a GradScaler would skip it) still answers with the input
gradients, as before: it must not fail the caller's loss.backward(). Only a batch of several requests that overflows
is retried one request at a time, so that one request cannot cost the others batched with it their update."""

import pytest
import torch

from hivemind.dht import DHT
from hivemind.moe.client.expert import RemoteExpert
from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker
from hivemind.moe.expert_uid import ExpertInfo
from hivemind.moe.server.module_backend import ModuleBackend
from hivemind.moe.server.server import Server
from hivemind.utils.tensor_descr import BatchTensorDescriptor

HID = 8


@pytest.mark.timeout(60)
def test_a_half_expert_whose_parameter_gradients_overflow_still_answers_backward():
    torch.manual_seed(0)
    module = torch.nn.Linear(HID, HID).half()
    before = [parameter.detach().clone() for parameter in module.parameters()]
    backend = ModuleBackend(
        "expert.0",
        module,
        optimizer=torch.optim.SGD(module.parameters(), lr=0.1),
        args_schema=(BatchTensorDescriptor(HID, dtype=torch.float16),),
        outputs_schema=BatchTensorDescriptor(HID, dtype=torch.float16),
        max_batch_size=64,
    )
    server = Server(DHT(start=True), {"expert.0": backend}, update_period=30, start=True)
    client_dht = DHT(start=True, initial_peers=server.dht.get_visible_maddrs())
    try:
        p2p = RemoteExpertWorker.run_coroutine(client_dht.replicate_p2p())
        expert = RemoteExpert(ExpertInfo("expert.0", server.dht.peer_id), p2p)
        inputs = torch.full((8, HID), 30.0, dtype=torch.float16, requires_grad=True)
        outputs = expert(inputs)
        # the weight gradient sums 8 rows of 30 * 300 = 72000 > 65504 (inf in float16); the input gradient is finite
        outputs.backward(torch.full_like(outputs, 300.0))
        assert inputs.grad is not None and torch.isfinite(inputs.grad).all()
        with backend._update_lock:
            for parameter, old in zip(module.parameters(), before):
                assert torch.equal(parameter, old), "the overflowing update was applied"
    finally:
        client_dht.shutdown()
        server.shutdown()
