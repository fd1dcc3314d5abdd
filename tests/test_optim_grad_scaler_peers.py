"""hivemind.GradScaler with several peers: each peer's loss scale is its own (it backs off after that peer's inf/NaN
batches), so gradients are unscaled by each peer before they are averaged, and a peer whose accumulated gradients
are not finite averages with weight 0."""

import copy
import threading
import time

import pytest
import torch
from optim_swarm_helpers import joined_optimizers, make_optimizer, swarm

from hivemind.optim.grad_scaler import GradScaler

__all__ = ["swarm"]  # the fixture, used by the tests below


def _train_until_first_epoch(models, opts, scalers, losses, zero_grad=True):
    """Each peer, in its own thread, steps with ``scaler.scale(losses[i](model))`` until its epoch 1 begins."""
    errors = []

    def train(model, opt, scaler, loss_fn):
        try:
            while opt.local_epoch < 1:
                if zero_grad:
                    opt.zero_grad()
                scaler.scale(loss_fn(model)).backward()
                scaler.step(opt)
                scaler.update()
                time.sleep(0.01)
        except BaseException as e:  # reported by the test's thread
            errors.append(e)

    threads = [threading.Thread(target=train, args=peer) for peer in zip(models, opts, scalers, losses)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors and all(opt.local_epoch == 1 for opt in opts)


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(delay_optimizer_step=True, delay_grad_averaging=True),
        dict(reuse_grad_buffers=True),
        dict(offload_optimizer=False),
    ],
    ids=["default", "delayed-grad-averaging", "reuse-buffers", "no-offload"],
)
def test_peers_with_different_loss_scales_step_with_the_true_mean_gradient(swarm, options):
    torch.manual_seed(0)
    x, y = torch.randn(4, 8), torch.randn(4, 1)
    models = [torch.nn.Linear(8, 1) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    reference = copy.deepcopy(models[0])
    # e.g. the second peer already met two inf batches: its scale backed off twice
    scalers = [GradScaler("cpu", init_scale=1024.0), GradScaler("cpu", init_scale=256.0)]
    # (shutting the optimizers down also applies a delayed optimizer step)
    with joined_optimizers(swarm(2), models, average_state_every=1000, **options) as opts:
        # both peers use one batch: the mean gradient is that batch's gradient
        loss = lambda model: torch.nn.functional.mse_loss(model(x), y)  # noqa: E731
        _train_until_first_epoch(models, opts, scalers, [loss, loss], zero_grad=not options.get("reuse_grad_buffers"))
    torch.nn.functional.mse_loss(reference(x), y).backward()
    torch.optim.SGD(reference.parameters(), lr=0.1).step()
    for model in models:
        for param, expected in zip(model.parameters(), reference.parameters()):
            assert torch.allclose(param, expected, atol=1e-6)
    assert [scaler.get_scale() for scaler in scalers] == [1024.0, 256.0]  # no inf: no back-off (nor growth yet)


@pytest.mark.timeout(90)
def test_peer_whose_accumulated_gradients_overflow_averages_with_weight_zero_and_backs_off(swarm):
    torch.manual_seed(0)
    models = [torch.nn.Linear(8, 1, bias=False) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    reference = copy.deepcopy(models[0])
    x_good, x_overflow = torch.randn(4, 8), torch.full((4, 8), 0.75)
    # the second peer's gradient is 3 everywhere: 3 * 2^126 is a finite float32, twice that is not; so each of its
    # steps passes the per-step check while its accumulated sum overflows from the second step on. It takes one
    # step first (4 of 16 samples, and no speed measured yet: the epoch cannot end), so that whenever its epoch
    # ends, at least two steps were accumulated
    scalers = [GradScaler("cpu", init_scale=1024.0), GradScaler("cpu", init_scale=2.0**126)]
    with joined_optimizers(swarm(2), models, target_batch_size=16, average_state_every=1000) as opts:
        opts[1].zero_grad()
        scalers[1].scale(models[1](x_overflow).sum()).backward()
        scalers[1].step(opts[1])
        assert not scalers[1].update()
        assert opts[1].local_epoch == 0 and opts[1].grad_averager.local_times_accumulated == 1
        losses = [lambda model: model(x_good).sum(), lambda model: model(x_overflow).sum()]
        _train_until_first_epoch(models, opts, scalers, losses)
    reference(x_good).sum().backward()  # the average is the first peer's gradient alone
    torch.optim.SGD(reference.parameters(), lr=0.1).step()
    for model in models:
        assert torch.allclose(model.weight, reference.weight, atol=1e-6)
    assert [scaler.get_scale() for scaler in scalers] == [1024.0, 2.0**125]


@pytest.mark.timeout(60)
def test_lone_peer_whose_accumulated_gradients_overflow_skips_the_step_and_backs_off(swarm):
    (dht,) = swarm(1)
    model = torch.nn.Linear(8, 1, bias=False)
    before = model.weight.detach().clone()
    scaler = GradScaler("cpu", init_scale=2.0**126)  # gradient 3 everywhere: each step is finite, their sum is not
    # (weight decay would change the weights even in a step with zero gradients)
    opt = make_optimizer(dht, model, optimizer=lambda params: torch.optim.SGD(params, lr=0.1, weight_decay=0.1))
    try:
        while opt.local_epoch < 1:
            opt.zero_grad()
            scaler.scale(model(torch.full((4, 8), 0.75)).sum()).backward()
            scaler.step(opt)
            scaler.update()
    finally:
        opt.shutdown()
    assert torch.equal(model.weight, before)
    assert scaler.get_scale() == 2.0**125


@pytest.mark.timeout(60)
def test_local_updates_unscale_each_step_like_torch_amp(swarm):
    (dht,) = swarm(1)
    torch.manual_seed(0)
    model, x = torch.nn.Linear(8, 1, bias=False), torch.randn(4, 8)
    reference = copy.deepcopy(model)
    scaler = GradScaler("cpu", init_scale=1024.0)
    opt = make_optimizer(dht, model, use_local_updates=True)
    try:
        opt.zero_grad()
        scaler.scale(model(x).sum()).backward()
        scaler.step(opt)
        scaler.update()
    finally:
        opt.shutdown()
    reference(x).sum().backward()
    torch.optim.SGD(reference.parameters(), lr=0.1).step()
    assert torch.allclose(model.weight, reference.weight, atol=1e-6)
