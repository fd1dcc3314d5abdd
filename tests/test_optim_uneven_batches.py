"""Steps of different batch sizes within one epoch: the epoch's gradient is the mean over its samples."""

import pytest
import torch
from optim_swarm_helpers import make_optimizer

from hivemind.dht import DHT


@pytest.mark.timeout(60)
@pytest.mark.parametrize("batch_sizes", [(1, 4), (4, 1), (3, 3), (2, 5, 1)], ids=str)
def test_an_epoch_of_uneven_batches_steps_with_the_mean_gradient_of_its_samples(batch_sizes):
    """Every sample has the same gradient ``direction``, so the epoch's mean gradient is ``direction`` whatever the
    batch sizes: one SGD step (lr=0.1) moves the parameters by -0.1 * direction."""
    direction = torch.tensor([1.0, -2.0, 3.0])
    param = torch.nn.Parameter(torch.zeros(3))
    dht = DHT(start=True)
    opt = make_optimizer(dht, torch.nn.ParameterList([param]), "uneven_batches", target_batch_size=sum(batch_sizes))
    try:
        for batch_size in batch_sizes:
            opt.zero_grad()
            (param * direction).sum().backward()  # the mean over the batch of each sample's gradient
            opt.step(batch_size=batch_size)
        assert opt.local_epoch == 1
        assert torch.allclose(param.detach(), -0.1 * direction, atol=1e-6), param
    finally:
        opt.shutdown()
        dht.shutdown()
