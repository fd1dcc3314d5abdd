"""A peer that loads a later epoch (from a peer or a checkpoint) gets the learning rate its scheduler gives there."""

import copy
import functools

import pytest
import torch
from optim_swarm_helpers import dht_pair, make_optimizer, mse_step

__all__ = ["dht_pair"]  # the fixture, used below

HALVED_EACH_EPOCH = functools.partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5)


@pytest.mark.timeout(40)
@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler:UserWarning")  # the scheduler catches up epochs
def test_a_newcomer_gets_the_swarms_learning_rate_with_a_decaying_scheduler(dht_pair):
    torch.manual_seed(0)
    models = [torch.nn.Linear(4, 1) for _ in dht_pair]
    batch = torch.randn(4, 4), torch.randn(4, 1)
    options = dict(target_batch_size=4, batch_size_per_step=4, scheduler=HALVED_EACH_EPOCH)
    donor = make_optimizer(dht_pair[0], models[0], "scheduler_download", **options)
    newcomer = None
    try:
        while donor.local_epoch < 3:
            mse_step(models[0], donor, *batch)
        assert donor.opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**3)
        newcomer = make_optimizer(dht_pair[1], models[1], "scheduler_download", **options)
        newcomer.load_state_from_peers()
        assert newcomer.local_epoch == 3 and newcomer.state_averager.scheduler.last_epoch == 3
        assert newcomer.opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**3)  # not decayed twice
    finally:
        for opt in (donor, newcomer):
            if opt is not None:
                opt.shutdown()


@pytest.mark.timeout(30)
@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler:UserWarning")
def test_a_checkpoint_loaded_in_a_new_process_resumes_the_learning_rate_of_its_epoch(dht_pair):
    torch.manual_seed(0)
    models = [torch.nn.Linear(4, 1) for _ in dht_pair]
    batch = torch.randn(4, 4), torch.randn(4, 1)
    options = dict(target_batch_size=4, batch_size_per_step=4, scheduler=HALVED_EACH_EPOCH)
    first = make_optimizer(dht_pair[0], models[0], "scheduler_checkpoint", **options)
    try:
        while first.local_epoch < 3:
            mse_step(models[0], first, *batch)
        checkpoint = copy.deepcopy(first.state_dict())
    finally:
        first.shutdown()
    restarted = make_optimizer(dht_pair[1], models[1], "scheduler_checkpoint", **options)  # as after a restart
    try:
        restarted.load_state_dict(checkpoint)
        assert restarted.local_epoch == 3 and restarted.state_averager.scheduler.last_epoch == 3
        assert restarted.opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**3)
    finally:
        restarted.shutdown()


@pytest.mark.timeout(30)
@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler:UserWarning")
@pytest.mark.parametrize("factory", [True, False], ids=["scheduler-factory", "scheduler-instance"])
def test_rolling_back_to_an_earlier_checkpoint_rewinds_the_scheduler_to_its_epoch(dht_pair, factory):
    torch.manual_seed(0)
    model, batch = torch.nn.Linear(4, 1), (torch.randn(4, 4), torch.randn(4, 1))
    if factory:
        options = dict(optimizer=lambda params: torch.optim.SGD(params, lr=0.1), scheduler=HALVED_EACH_EPOCH)
    else:
        inner = torch.optim.SGD(model.parameters(), lr=0.1)
        options = dict(optimizer=inner, params=None, scheduler=HALVED_EACH_EPOCH(inner))
    opt = make_optimizer(dht_pair[0], model, "scheduler_rollback", target_batch_size=4, **options)
    try:
        while opt.local_epoch < 2:
            mse_step(model, opt, *batch)
        checkpoint = copy.deepcopy(opt.state_dict())
        while opt.local_epoch < 5:
            mse_step(model, opt, *batch)
        opt.load_state_dict(checkpoint)  # e.g. the loss diverged: back to epoch 2
        assert opt.local_epoch == 2 and opt.state_averager.scheduler.last_epoch == 2
        assert opt.opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**2)
        while opt.local_epoch < 3:
            mse_step(model, opt, *batch)
        assert opt.opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**3)
    finally:
        opt.shutdown()
