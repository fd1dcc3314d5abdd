"""A backward request whose finite gradients make the parameter gradients of its batch overflow must not cost the
good requests batched with it their update: the batch's whole update was skipped, silently for the good callers
(they got their input gradients, and the expert did not learn from them). Now such a batch is retried one request at
a time, like a batch that raised: the good requests are applied; the overflowing one, alone, gets its input gradients
and its update is skipped (as that of an fp16 expert's occasional overflow is)."""

import asyncio
import copy

import pytest
import torch
from moe_hostile_helpers import HIDDEN, connect_attacker, make_request

from hivemind.compression import deserialize_torch_tensor
from hivemind.dht import DHT
from hivemind.moe.server.module_backend import ModuleBackend
from hivemind.moe.server.server import Server
from hivemind.utils.tensor_descr import BatchTensorDescriptor

UID = "expert.0"
LR = 0.1


def sgd_step(module: torch.nn.Module, inputs: torch.Tensor, grad_outputs: torch.Tensor) -> torch.Tensor:
    """What the expert's update for one request is: (the input gradient), module stepped in place."""
    inputs = inputs.clone().requires_grad_(True)
    module(inputs).backward(grad_outputs)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter -= LR * parameter.grad
            parameter.grad = None
    return inputs.grad


@pytest.mark.timeout(60)
async def test_an_overflowing_backward_request_does_not_cancel_the_update_of_those_batched_with_it():
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(HIDDEN, HIDDEN), torch.nn.Tanh())
    reference = copy.deepcopy(module)
    backend = ModuleBackend(
        UID,
        module,
        optimizer=torch.optim.SGD(module.parameters(), lr=LR),
        args_schema=(BatchTensorDescriptor(HIDDEN),),
        outputs_schema=BatchTensorDescriptor(HIDDEN),
        max_batch_size=64,
        min_batch_size=6,  # the two requests below (6 examples) form one batch
    )
    server = Server(DHT(start=True), {UID: backend}, update_period=30, start=True)
    client, stub = await connect_attacker(server)
    try:
        good_inputs, good_grads = torch.randn(3, HIDDEN), torch.randn(3, HIDDEN)
        # finite, but the bias gradient of the batch sums 3 rows of 3e38 (tanh'(0) = 1): inf in float32
        bad_inputs, bad_grads = torch.zeros(3, HIDDEN), torch.full((3, HIDDEN), 3e38)
        good, bad = await asyncio.gather(
            stub.rpc_backward(make_request(UID, good_inputs, good_grads), timeout=30),
            stub.rpc_backward(make_request(UID, bad_inputs, bad_grads), timeout=30),
            return_exceptions=True,
        )
        assert not isinstance(bad, BaseException), bad  # (answered, its update skipped)
        assert not isinstance(good, BaseException), good
        expected_grad = sgd_step(reference, good_inputs, good_grads)
        (grad,) = [deserialize_torch_tensor(tensor) for tensor in good.tensors]
        assert torch.allclose(grad, expected_grad, atol=1e-5)
        with backend._update_lock:
            for parameter, expected in zip(module.parameters(), reference.parameters()):
                assert torch.allclose(parameter, expected, atol=1e-6), "the good request's update was not applied"
    finally:
        await client.shutdown()
        server.shutdown()
