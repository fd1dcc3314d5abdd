"""Optimizer.step(closure): the closure runs after the finished background work was applied to the model."""

import pytest
import torch
from optim_swarm_helpers import make_optimizer, mse_step

from hivemind.dht import DHT


@pytest.mark.timeout(30)
def test_a_closure_computes_its_loss_on_the_parameters_of_a_finished_delayed_step():
    dht = DHT(start=True)
    model = torch.nn.Linear(2, 1)
    opt = make_optimizer(dht, model, "closure_order", target_batch_size=4, delay_optimizer_step=True)
    try:
        x, y = torch.randn(4, 2), torch.randn(4, 1)
        mse_step(model, opt, x, y)  # alone, 4 of 4 samples: the epoch ends, its step runs in the background
        assert opt.local_epoch == 1
        opt.state_averager.wait_for_background_step()  # finished, not yet applied to the model
        stepped = [param.detach().clone() for param in opt.state_averager.optimizer_parameters]
        seen = []

        def closure():
            seen.append([param.detach().clone() for param in model.parameters()])
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            return loss

        loss = opt.step(closure)
        assert all(torch.equal(mine, theirs) for mine, theirs in zip(seen[0], stepped))
        with torch.no_grad():
            assert loss.item() == pytest.approx(torch.nn.functional.mse_loss(model(x), y).item())
    finally:
        opt.shutdown()
        dht.shutdown()
