"""A delayed optimizer step uses the learning rate of the epoch it ends, not the next one's."""

import pytest
import torch
from averager_helpers import dht_swarm
from optim_swarm_helpers import make_optimizer, mse_step, wait_for


@pytest.mark.timeout(60)
def test_a_step_delayed_behind_background_gradient_averaging_uses_its_epochs_learning_rate():
    torch.manual_seed(0)
    models = [torch.nn.Linear(2, 1) for _ in range(2)]
    options = dict(
        target_batch_size=4, delay_grad_averaging=True, matchmaking_time=1.0, averaging_timeout=2.0,
        optimizer=lambda params: torch.optim.SGD(params, lr=1.0),
        scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.0),  # epoch 0: 1, then 0
    )  # fmt: skip
    with dht_swarm(2) as dhts:
        opts = [make_optimizer(dht, model, "delayed_step_lr", **options) for dht, model in zip(dhts, models)]
        trainer = opts[0]
        try:
            wait_for(lambda: trainer.tracker.global_progress.num_peers == 2)
            x, y = torch.randn(4, 2), torch.randn(4, 1)
            reference = torch.nn.Linear(2, 1)
            reference.load_state_dict(models[0].state_dict())
            # the epoch ends; the other peer is expected but does not average, so the background step waits for
            # the gradient round to give up, long after this thread moved on to epoch 1
            mse_step(models[0], trainer, x, y)
            assert trainer.local_epoch == 1
            trainer.state_averager.wait_for_background_step()
            trainer.state_averager.step()
            assert trainer.param_groups[0]["lr"] == 0.0  # the scheduler is at epoch 1 afterwards
        finally:
            for opt in opts:
                opt.shutdown()
    torch.nn.functional.mse_loss(reference(x), y).backward()
    torch.optim.SGD(reference.parameters(), lr=1.0).step()  # what epoch 0's step does with its learning rate
    for mine, expected in zip(models[0].parameters(), reference.parameters()):
        assert torch.allclose(mine, expected, atol=1e-6)
