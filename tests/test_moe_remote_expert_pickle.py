"""RemoteExpert sent to another process (pickled), against a real expert server."""

import multiprocessing as mp
import pickle

import pytest
import torch
import torch.nn as nn
from moe_swarm_helpers import serving_experts

from hivemind.moe import ModuleBackend, get_experts
from hivemind.utils.tensor_descr import BatchTensorDescriptor

HID = 4


def _call_in_child(pickled_expert: bytes, inputs: torch.Tensor, connection) -> None:
    torch.set_num_threads(1)  # a forked child must not start OpenMP threads after the parent used them
    try:
        expert = pickle.loads(pickled_expert)
        inputs = inputs.clone().requires_grad_(True)
        output = expert(inputs)
        output.sum().backward()
        connection.send((output.tolist(), inputs.grad.tolist()))  # plain lists: no shared memory to outlive us
    except BaseException as e:
        connection.send(repr(e))
    finally:
        connection.close()


@pytest.mark.timeout(60)
def test_remote_expert_pickled_into_another_process_computes_the_same_outputs_and_gradients():
    torch.manual_seed(0)
    module = nn.Linear(HID, HID)
    backends = {"ffn.7": ModuleBackend("ffn.7", module, args_schema=(BatchTensorDescriptor(HID),), max_batch_size=8)}
    with serving_experts(backends) as (_, client_dht):
        (expert,) = get_experts(client_dht, ["ffn.7"])
        inputs = torch.randn(3, HID)
        expected = expert(inputs)
        parent_end, child_end = mp.Pipe()
        child = mp.get_context("fork").Process(target=_call_in_child, args=(pickle.dumps(expert), inputs, child_end))
        child.start()
        try:
            assert parent_end.poll(45), "the child did not answer"
            result = parent_end.recv()
        finally:
            child.join(10)
            if child.is_alive():
                child.kill()
        assert not isinstance(result, str), result
        output, grad = map(torch.tensor, result)
        assert torch.allclose(output, expected, atol=1e-6)
        assert torch.allclose(grad, module.weight.detach().sum(dim=0).expand(3, HID), atol=1e-6)
