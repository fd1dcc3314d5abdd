"""hivemind.GradScaler: unscales and steps only during a global step, updates the scale only after one (or infs)."""

import pytest
import torch

from hivemind.optim.grad_scaler import GradScaler


def make_model_and_optimizer(lr=0.1):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    return model, torch.optim.SGD(model.parameters(), lr=lr)


def backward_scaled(scaler, model, poison=False):
    loss = model(torch.ones(3, 4)).pow(2).sum()
    scaler.scale(loss).backward()
    if poison:
        model.weight.grad[0, 0] = float("inf")


def test_global_step_unscales_then_steps_like_plain_sgd():
    model, opt = make_model_and_optimizer()
    reference, reference_opt = make_model_and_optimizer()
    scaler = GradScaler("cpu", init_scale=1024.0)

    backward_scaled(scaler, model)
    reference(torch.ones(3, 4)).pow(2).sum().backward()
    reference_opt.step()
    with scaler.running_global_step():
        assert scaler.unscale_(opt)
        assert scaler.step(opt)
    assert torch.allclose(model.weight, reference.weight) and torch.allclose(model.bias, reference.bias)
    assert scaler.update()  # a real step happened: the scale is updated (and stays, no infs, no growth yet)
    assert scaler.get_scale() == 1024.0


def test_inf_gradients_are_detected_and_the_scale_backs_off():
    model, opt = make_model_and_optimizer()
    scaler = GradScaler("cpu", init_scale=1024.0)
    backward_scaled(scaler, model, poison=True)
    assert not scaler.are_grads_finite(opt)
    assert not scaler.are_grads_finite(opt, use_cached=True)
    assert scaler.update()
    assert scaler.get_scale() == 512.0


def test_finite_gradients_are_left_unchanged_by_the_check():
    model, opt = make_model_and_optimizer()
    scaler = GradScaler("cpu", init_scale=1024.0)
    backward_scaled(scaler, model)
    before = model.weight.grad.clone()
    assert scaler.are_grads_finite(opt)
    assert torch.equal(model.weight.grad, before)


def test_update_without_a_step_or_infs_keeps_the_scale():
    model, opt = make_model_and_optimizer()
    scaler = GradScaler("cpu", init_scale=1024.0, growth_interval=1)
    backward_scaled(scaler, model)
    assert scaler.are_grads_finite(opt)
    assert not scaler.update()
    assert scaler.get_scale() == 1024.0


def test_global_step_with_inf_gradients_skips_the_inner_step():
    model, opt = make_model_and_optimizer()
    scaler = GradScaler("cpu", init_scale=1024.0)
    backward_scaled(scaler, model, poison=True)
    before = model.weight.detach().clone()
    with scaler.running_global_step():
        assert not scaler.step(opt)
    assert torch.equal(model.weight, before)
    assert scaler.update() and scaler.get_scale() == 512.0


@pytest.mark.parametrize("method", ["step", "unscale_"])
def test_outside_a_global_step_a_plain_torch_optimizer_is_refused(method):
    _, opt = make_model_and_optimizer()
    with pytest.raises(ValueError, match="hivemind.Optimizer"):
        getattr(GradScaler("cpu"), method)(opt)


def test_disabled_scaler_steps_without_scaling():
    model, opt = make_model_and_optimizer()
    scaler = GradScaler("cpu", enabled=False)
    backward_scaled(scaler, model)
    before = model.weight.detach().clone()
    assert scaler.are_grads_finite(opt)
    with scaler.running_global_step():
        assert scaler.step(opt)
    assert not torch.equal(model.weight, before)
    assert not scaler.update()


def test_accumulated_gradients_are_divided_by_the_scale_and_count_as_a_step_for_update():
    _, opt = make_model_and_optimizer()
    scaler = GradScaler("cpu", init_scale=1024.0, growth_interval=1)
    scaler.scale(torch.ones(()))  # (the scale tensor is created on first use)
    grads = [torch.full((3,), 2048.0), torch.full((2, 2), 512.0, dtype=torch.float16)]
    assert scaler.unscale_accumulated_grads_(opt, grads)
    assert torch.equal(grads[0], torch.full((3,), 2.0)) and torch.equal(grads[1], torch.full((2, 2), 0.5).half())
    assert scaler.update() and scaler.get_scale() == 2048.0  # finite: one more good step (growth_interval=1)


def test_non_finite_accumulated_gradients_are_reported_and_the_scale_backs_off():
    _, opt = make_model_and_optimizer()
    scaler = GradScaler("cpu", init_scale=1024.0)
    scaler.scale(torch.ones(()))
    grads = [torch.ones(3), torch.tensor([1.0, float("nan")])]
    assert not scaler.unscale_accumulated_grads_(opt, grads)
    assert scaler.update() and scaler.get_scale() == 512.0
