"""A RemoteMixtureOfExperts handed to a spawned process (e.g. a DataLoader worker with the spawn start method)."""

import multiprocessing as mp

import pytest
import torch
import torch.nn as nn
from moe_swarm_helpers import serving_experts

from hivemind.moe import ModuleBackend, RemoteMixtureOfExperts
from hivemind.utils.tensor_descr import BatchTensorDescriptor

HID = 4


def _mixture_outputs(mixture: RemoteMixtureOfExperts, inputs: torch.Tensor, connection) -> None:
    try:
        connection.send(mixture(inputs).tolist())  # plain lists: no shared memory to outlive us
    except BaseException as e:
        connection.send(repr(e))
    finally:
        connection.close()


@pytest.mark.timeout(120)
def test_mixture_passed_to_a_spawned_process_computes_the_same_outputs():
    torch.manual_seed(0)
    backends = {
        f"ffn.{i}": ModuleBackend(
            f"ffn.{i}", nn.Linear(HID, HID), args_schema=(BatchTensorDescriptor(HID),), max_batch_size=8
        )
        for i in range(2)
    }
    with serving_experts(backends) as (_, client_dht):
        mixture = RemoteMixtureOfExperts(in_features=HID, grid_size=(2,), dht=client_dht, uid_prefix="ffn.", k_best=2)
        inputs = torch.randn(3, HID)
        with torch.no_grad():
            expected = mixture(inputs)
        context = mp.get_context("spawn")
        parent_end, child_end = context.Pipe()
        # (its penalties of failed experts held a threading.Lock: "cannot pickle '_thread.lock' object")
        child = context.Process(target=_mixture_outputs, args=(mixture, inputs, child_end))
        child.start()
        try:
            assert parent_end.poll(90), "the child did not answer"
            result = parent_end.recv()
        finally:
            child.join(10)
            if child.is_alive():
                child.kill()
        assert not isinstance(result, str), result
        assert torch.allclose(torch.tensor(result), expected, atol=1e-6)
