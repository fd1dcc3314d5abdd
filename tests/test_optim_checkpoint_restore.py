"""Restoring a checkpoint (model, then hivemind.Optimizer) gives the checkpoint's parameters and trains from them."""

import copy

import pytest
import torch
from optim_swarm_helpers import make_optimizer, mse_step

from hivemind.dht import DHT
from hivemind.optim.optimizer_state import initialize_optimizer_state_


@pytest.mark.timeout(30)
@pytest.mark.parametrize("delay_optimizer_step", [False, True], ids=["plain", "delayed-step"])
def test_loading_model_then_optimizer_state_keeps_the_loaded_parameters(delay_optimizer_step):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    batch = torch.randn(4, 4), torch.randn(4, 1)
    dht = DHT(start=True)
    opt = make_optimizer(  # an optimizer factory: the optimizer runs on CPU copies of the parameters
        dht, model, "checkpoint", target_batch_size=4, batch_size_per_step=4,
        optimizer=lambda params: torch.optim.Adam(params, lr=0.1), delay_optimizer_step=delay_optimizer_step,
    )  # fmt: skip
    try:
        assert opt.offload_optimizer
        while opt.local_epoch < 2:
            mse_step(model, opt, *batch)
        opt.state_averager.step(wait_for_delayed_updates=True)  # (a delayed step lands in the model)
        checkpoint = copy.deepcopy(dict(model=model.state_dict(), opt=opt.state_dict()))
        while opt.local_epoch < 4:
            mse_step(model, opt, *batch)

        model.load_state_dict(checkpoint["model"])
        opt.load_state_dict(copy.deepcopy(checkpoint["opt"]))  # (torch shares its tensors)
        assert opt.local_epoch == 2
        for name, param in model.named_parameters():
            assert torch.equal(param, checkpoint["model"][name]), name  # not the parameters of epoch 4

        reference = copy.deepcopy(model)
        reference_opt = torch.optim.Adam(reference.parameters(), lr=0.1)
        reference_state = copy.deepcopy(checkpoint["opt"])
        del reference_state["state"]["local_epoch"]
        reference_opt.load_state_dict(reference_state)
        mse_step(reference, reference_opt, *batch)
        mse_step(model, opt, *batch)  # the next global step starts from the loaded parameters
        opt.state_averager.step(wait_for_delayed_updates=True)
        assert opt.local_epoch == 3
        for param, expected in zip(model.parameters(), reference.parameters()):
            assert torch.allclose(param, expected, atol=1e-6)
    finally:
        opt.shutdown()
        dht.shutdown()


@pytest.mark.timeout(30)
def test_a_checkpoint_taken_right_after_a_delayed_step_holds_the_parameters_of_its_epoch():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    batch = torch.randn(4, 4), torch.randn(4, 1)
    reference = copy.deepcopy(model)
    reference_opt = torch.optim.Adam(reference.parameters(), lr=0.1)
    initialize_optimizer_state_(reference_opt)  # as hivemind.Optimizer (and 1.1.12) does: Adam's step counter is 1
    mse_step(reference, reference_opt, *batch)
    dht = DHT(start=True)
    opt = make_optimizer(
        dht, model, "checkpoint_delayed", target_batch_size=4, batch_size_per_step=4,
        optimizer=lambda params: torch.optim.Adam(params, lr=0.1), delay_optimizer_step=True,
    )  # fmt: skip
    try:
        mse_step(model, opt, *batch)  # the epoch ends; its optimizer step runs in the background
        assert opt.local_epoch == 1
        checkpoint = copy.deepcopy(dict(model=model.state_dict(), opt=opt.state_dict()))  # as torch.save({...}) does
        assert checkpoint["opt"]["state"]["local_epoch"] == 1
        for name, expected in reference.state_dict().items():  # not the parameters of epoch 0
            assert torch.allclose(checkpoint["model"][name], expected, atol=1e-6), name
    finally:
        opt.shutdown()
        dht.shutdown()


@pytest.mark.timeout(30)
def test_a_checkpoint_of_another_model_is_refused_and_the_optimizer_keeps_training():
    other = torch.nn.Linear(3, 1)
    other_opt = torch.optim.Adam(other.parameters(), lr=0.1)
    other(torch.randn(2, 3)).sum().backward()
    other_opt.step()
    checkpoint = dict(other_opt.state_dict(), state=dict(other_opt.state_dict()["state"], local_epoch=3))
    model, batch = torch.nn.Linear(4, 1), (torch.randn(4, 4), torch.randn(4, 1))
    dht = DHT(start=True)
    opt = make_optimizer(dht, model, "foreign_checkpoint", target_batch_size=4,
                         optimizer=lambda params: torch.optim.Adam(params, lr=0.1))  # fmt: skip
    try:
        with pytest.raises(ValueError, match=r"shape \(1, 3\).*\(1, 4\)"):
            opt.load_state_dict(checkpoint)
        assert opt.local_epoch == 0
        while opt.local_epoch < 2:  # (the refused state would fail every optimizer step)
            mse_step(model, opt, *batch)
    finally:
        opt.shutdown()
        dht.shutdown()
