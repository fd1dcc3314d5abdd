"""hivemind.Optimizer.param_groups work like a torch optimizer's: a setting changed there changes the training."""

import pytest
import torch
from optim_swarm_helpers import make_optimizer, mse_step

from hivemind.dht import DHT


@pytest.mark.timeout(30)
def test_a_learning_rate_set_through_param_groups_is_the_one_the_global_step_uses():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    dht = DHT(start=True)
    opt = make_optimizer(dht, model, "param_groups_lr", target_batch_size=4, batch_size_per_step=4)
    try:
        for group in opt.param_groups:  # e.g. a manual learning-rate warm-up
            group["lr"] = 0.0
        assert [group["lr"] for group in opt.opt.param_groups] == [0.0]
        assert [p for group in opt.param_groups for p in group["params"]] == list(model.parameters())
        before = [param.detach().clone() for param in model.parameters()]
        mse_step(model, opt, torch.randn(4, 4), torch.randn(4, 1))
        assert opt.local_epoch == 1  # a global step ran, with lr=0
        assert all(torch.equal(old, new) for old, new in zip(before, model.parameters()))
    finally:
        opt.shutdown()
        dht.shutdown()


def test_the_parameters_of_a_param_group_cannot_be_replaced():
    dht = DHT(start=True)
    opt = make_optimizer(dht, torch.nn.Linear(4, 1), "param_groups_params")
    try:
        with pytest.raises(ValueError, match="cannot be replaced"):
            opt.param_groups[0]["params"] = [torch.nn.Parameter(torch.zeros(1))]
    finally:
        opt.shutdown()
        dht.shutdown()
