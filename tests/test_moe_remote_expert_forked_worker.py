"""A RemoteExpert created in the training process and used by forked DataLoader workers (which inherit it)."""

import glob
import os

import pytest
import torch
import torch.nn as nn
from moe_swarm_helpers import serving_experts

from hivemind.moe import ModuleBackend, get_experts
from hivemind.p2p.stale_sockets import P2P_SOCKET_DIR
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


class _WorkerPids(torch.utils.data.Dataset):
    """Calls the expert in a worker and returns the worker's pid."""

    def __init__(self, expert: nn.Module):
        self.expert = expert

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int):
        self.expert(torch.zeros(1, HID))
        return os.getpid()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_dataloader_workers_that_called_an_expert_leave_no_p2p_client_socket(start_method: str):
    module = nn.Linear(HID, HID)
    backends = {"ffn.5": ModuleBackend("ffn.5", module, args_schema=(BatchTensorDescriptor(HID),), max_batch_size=8)}
    with serving_experts(backends) as (_, client_dht):
        (expert,) = get_experts(client_dht, ["ffn.5"])
        expert(torch.zeros(1, HID))
        loader = torch.utils.data.DataLoader(
            _WorkerPids(expert), batch_size=1, num_workers=2, multiprocessing_context=start_method, timeout=60
        )
        worker_pids = {int(pid) for pid in torch.cat(list(loader))}  # the workers have exited when the loop ends
        assert len(worker_pids) == 2
        # (each opened a connection to the daemon, listening on a socket file of its own; nothing swept these
        # until some process started a new p2pd, so every epoch of a long run added one file per worker)
        left = [path for pid in worker_pids for path in glob.glob(f"{P2P_SOCKET_DIR}/hivemind-p2pclient-{pid}_*")]
        assert not left, f"worker processes left their P2P client sockets behind: {left}"
