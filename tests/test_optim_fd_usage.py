"""hivemind.Optimizer over a model of many parameter tensors: its offloaded copies, gradient buffers and averaged
tensors sit in a few shared buffers, not one shared-memory file (one file descriptor) per tensor."""

import os

import pytest
import torch
from averager_helpers import dht_swarm

from hivemind.optim.optimizer import Optimizer

NUM_TENSORS = 600


def count_fds(pid: int = None) -> int:
    return len(os.listdir(f"/proc/{pid or os.getpid()}/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts file descriptors through /proc")
@pytest.mark.timeout(120)
def test_an_optimizer_of_600_tensors_costs_a_few_fds_in_every_process():
    model = torch.nn.Sequential(*[torch.nn.Linear(2, 2) for _ in range(NUM_TENSORS // 2)])
    with dht_swarm(1) as (dht,):
        before = count_fds()
        opt = Optimizer(
            dht=dht, run_id="fd_usage", params=model.parameters(), optimizer=lambda params: torch.optim.Adam(params),
            target_batch_size=32, batch_size_per_step=4, verbose=False,
        )  # fmt: skip
        try:
            added = count_fds() - before
            in_averagers = [count_fds(averager.pid) for averager in (opt.state_averager, opt.grad_averager)]
        finally:
            opt.shutdown()
    # one descriptor per tensor would be 600 in each (the count before this fix: ~620 in each); a forked averager
    # also inherits what this (test worker) process had open
    assert added < 100, added
    assert all(count < before + 100 for count in in_averagers), (before, in_averagers)
