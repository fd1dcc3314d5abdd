"""A RemoteExpert created in the training process and used by forked DataLoader workers (which inherit it)."""

import pytest
import torch
import torch.nn as nn
from moe_swarm_helpers import serving_experts

from hivemind.moe import ModuleBackend, get_experts
from hivemind.utils.tensor_descr import BatchTensorDescriptor

HID = 4


class _ExpertOutputs(torch.utils.data.Dataset):
    """Each item is the expert's output for one row of ``inputs`` and the gradient of its sum, computed in a worker."""

    def __init__(self, expert: nn.Module, inputs: torch.Tensor):
        self.expert, self.inputs = expert, inputs

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int):
        row = self.inputs[index : index + 1].clone().requires_grad_(True)
        output = self.expert(row)
        output.sum().backward()
        return output[0].detach(), row.grad[0]


@pytest.mark.timeout(90)
@pytest.mark.parametrize("used_before_fork", [True, False], ids=["used-before-fork", "never-used-before-fork"])
def test_forked_dataloader_workers_call_an_inherited_remote_expert(used_before_fork: bool):
    torch.manual_seed(0)
    module = nn.Linear(HID, HID)
    backends = {"ffn.3": ModuleBackend("ffn.3", module, args_schema=(BatchTensorDescriptor(HID),), max_batch_size=8)}
    with serving_experts(backends) as (_, client_dht):
        (expert,) = get_experts(client_dht, ["ffn.3"])
        inputs = torch.randn(4, HID)
        expected = module(inputs).detach()
        if used_before_fork:  # the parent's connection to p2pd is then in use by its own event loop thread
            assert torch.allclose(expert(inputs), expected, atol=1e-6)
        loader = torch.utils.data.DataLoader(
            _ExpertOutputs(expert, inputs), batch_size=2, num_workers=2, multiprocessing_context="fork", timeout=30
        )
        outputs, grads = map(torch.cat, zip(*loader))  # (the workers hung on their first call before)
        assert torch.allclose(outputs, expected, atol=1e-6)
        assert torch.allclose(grads, module.weight.detach().sum(dim=0).expand(4, HID), atol=1e-6)
        assert torch.allclose(expert(inputs), expected, atol=1e-6), "the parent's expert stopped working"
