"""hivemind.Optimizer with real DHTs: matches local training, state round trips, late joiners, misuse errors."""

import copy
import functools
import logging
import threading
import time

import optim_swarm_helpers
import pytest
import torch
from optim_swarm_helpers import (
    FAST_TRACKER,
    RegressionTask,
    assert_like_local_training,
    donor_then_newcomer,
    joined_optimizers,
    mse_step,
    swarm,
    wait_for,
)

from hivemind.dht import DHT
from hivemind.optim.grad_scaler import GradScaler
from hivemind.optim.optimizer import Optimizer
from hivemind.optim.power_sgd_averager import PowerSGDGradientAverager
from hivemind.optim.progress_tracker import ProgressTracker

__all__ = ["swarm"]  # the fixture, used by the tests below

# these tests count on 32 samples per epoch unless they pass another target_batch_size
make_optimizer = functools.partial(optim_swarm_helpers.make_optimizer, target_batch_size=32)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("second_in_client_mode", [False, True], ids=["two-nodes", "node-and-client"])
def test_two_peers_train_exactly_like_local_training_with_the_global_batch(swarm, second_in_client_mode):
    epochs = 3
    torch.manual_seed(0)
    data = [(torch.randn(4, 8), torch.randn(4, 1)) for _ in range(epochs)]
    initial_state = torch.nn.Linear(8, 1).state_dict()
    models = [torch.nn.Linear(8, 1) for _ in range(2)]
    opts = []
    (first_dht,) = swarm(1)
    second_dht = DHT(initial_peers=first_dht.get_visible_maddrs(), client_mode=second_in_client_mode, start=True)
    try:
        for model, dht in zip(models, (first_dht, second_dht)):
            model.load_state_dict(initial_state)
            opts.append(make_optimizer(dht, model))
        wait_for(lambda: all(opt.tracker.global_progress.num_peers == 2 for opt in opts))

        def train(model, opt):  # every sample of epoch e is data[e], so any split between peers gives the same mean
            while opt.local_epoch < epochs:
                mse_step(model, opt, *data[opt.local_epoch])
                time.sleep(0.01)

        threads = [threading.Thread(target=train, args=pair) for pair in zip(models, opts)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert all(opt.local_epoch == epochs for opt in opts)
    finally:
        for opt in opts:
            opt.shutdown()
        second_dht.shutdown()

    assert_like_local_training(models, initial_state, data)  # one step per epoch on that epoch's batch


@pytest.mark.timeout(90)
def test_a_peer_joining_mid_training_downloads_the_epoch_and_parameters(swarm):
    torch.manual_seed(0)
    batch = torch.randn(4, 8), torch.randn(4, 1)
    models = trainer_model, newcomer_model = torch.nn.Linear(8, 1), torch.nn.Linear(8, 1)
    with donor_then_newcomer(swarm(2), models, 3, batch, target_batch_size=8) as (trainer, newcomer):
        assert newcomer.local_epoch == trainer.local_epoch == 3
        for mine, theirs in zip(newcomer_model.parameters(), trainer_model.parameters()):
            assert torch.equal(mine, theirs)


@pytest.mark.timeout(60)
def test_state_dict_round_trip_keeps_the_inner_state_and_the_epoch(swarm):
    (dht,) = swarm(1)
    model = torch.nn.Linear(8, 1)
    opt = make_optimizer(dht, model, optimizer=lambda params: torch.optim.Adam(params, lr=0.01), target_batch_size=4)
    try:
        torch.manual_seed(0)
        while opt.local_epoch < 2:
            mse_step(model, opt, torch.randn(4, 8), torch.randn(4, 1))
        state = copy.deepcopy(opt.state_dict())  # like torch's, the state dict refers to the live tensors
        assert state["state"]["local_epoch"] == 2
        saved_moments = [opt.opt.state[p]["exp_avg"].clone() for p in opt.opt.param_groups[0]["params"]]

        mse_step(model, opt, torch.randn(4, 8), torch.randn(4, 1))
        assert opt.local_epoch == 3
        opt.load_state_dict(state)
        assert opt.local_epoch == 2
        restored = [opt.opt.state[p]["exp_avg"] for p in opt.opt.param_groups[0]["params"]]
        assert all(torch.equal(a, b) for a, b in zip(saved_moments, restored))
        assert state["state"]["local_epoch"] == 2  # the caller's dict is not consumed
    finally:
        opt.shutdown()


@pytest.fixture
def lonely_optimizer(swarm):
    (dht,) = swarm(1)
    model = torch.nn.Linear(3, 1)
    opt = make_optimizer(dht, model, batch_size_per_step=None, reuse_grad_buffers=True)
    yield model, opt
    opt.shutdown()


@pytest.mark.timeout(60)
def test_misuse_errors_say_what_to_do(lonely_optimizer):
    model, opt = lonely_optimizer
    model(torch.ones(2, 3)).sum().backward()
    with pytest.raises(ValueError, match="batch_size"):
        opt.step()
    with pytest.raises(ValueError, match="hivemind.GradScaler"):
        opt.step(batch_size=2, grad_scaler=torch.amp.GradScaler("cpu"))
    with pytest.raises(ValueError, match="add_param_group"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))]})
    with pytest.raises(ValueError, match="zero_grad"):
        opt.zero_grad()
    assert opt.local_epoch == 0 and opt.tracker.local_progress.samples_accumulated == 0


@pytest.mark.timeout(60)
def test_param_groups_point_at_the_model_parameters(lonely_optimizer):
    model, opt = lonely_optimizer
    assert [p for group in opt.param_groups for p in group["params"]] == list(model.parameters())
    assert opt.param_groups[0]["lr"] == 0.1


@pytest.mark.timeout(60)
def test_grad_scaler_path_drops_non_finite_batches_and_steps_on_finite_ones(swarm):
    (dht,) = swarm(1)
    model = torch.nn.Linear(8, 1)
    opt = make_optimizer(dht, model, target_batch_size=8)
    scaler = GradScaler("cpu", init_scale=1024.0)
    try:
        x, y = torch.randn(4, 8), torch.randn(4, 1)
        opt.zero_grad()
        scaler.scale(torch.nn.functional.mse_loss(model(x), y)).backward()
        model.weight.grad[0, 0] = float("inf")
        scaler.step(opt)
        assert scaler.update() and scaler.get_scale() == 512.0
        assert opt.grad_averager.local_samples_accumulated == 0

        before = model.weight.detach().clone()
        while opt.local_epoch < 1:
            opt.zero_grad()
            scaler.scale(torch.nn.functional.mse_loss(model(x), y)).backward()
            scaler.step(opt)
            scaler.update()
        reference = torch.nn.Linear(8, 1)
        reference.weight.data, reference.bias.data = before.clone(), model.bias.detach().clone()
        assert not torch.equal(model.weight, before)
        assert torch.isfinite(model.weight).all()
    finally:
        opt.shutdown()


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "options",
    [
        dict(offload_optimizer=False),
        dict(delay_optimizer_step=True),
        dict(delay_optimizer_step=True, delay_grad_averaging=True),
        dict(delay_state_averaging=False, average_state_every=2),
        dict(reuse_grad_buffers=True),
        dict(use_local_updates=True),
    ],
    ids=["no-offload", "delayed-step", "delayed-grad-averaging", "sync-state-averaging", "reuse-buffers", "local"],
)
def test_every_delay_offload_and_local_update_mode_converges(swarm, options):
    task = RegressionTask()
    with joined_optimizers(swarm(2), task.models, **options) as opts:  # shutdown also applies the last delayed step
        task.train_concurrently(opts, epochs=6)
    for model in task.models:
        assert task.full_loss(model) < 0.25 * task.initial_loss


def test_top_level_exports_the_optimizer_classes():
    import hivemind

    assert hivemind.Optimizer is Optimizer and hivemind.GradScaler is GradScaler
    assert hivemind.TrainingAverager.__name__ == "TrainingAverager"


@pytest.mark.timeout(120)
def test_power_sgd_gradient_averaging_converges(swarm):
    task = RegressionTask(out_features=8)
    factory = functools.partial(PowerSGDGradientAverager, averager_rank=2)
    options = dict(grad_averager_factory=factory, optimizer=lambda p: torch.optim.SGD(p, lr=0.3))
    with joined_optimizers(swarm(2), task.models, **options) as opts:
        assert list(opts[0].grad_averager._matrix_shapes) == [0]  # the weight's gradient is sent as rank-2 factors
        task.train_concurrently(opts, epochs=8)
    for model in task.models:
        assert task.full_loss(model) < 0.5 * task.initial_loss


class _RecordingHandler(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.mark.timeout(60)
def test_failed_gradient_averaging_falls_back_to_local_gradients_within_the_timeout(swarm):
    trainer_dht, ghost_dht = swarm(2)
    # a peer that reports progress but never averages, e.g. one that died after its last report
    ghost = ProgressTracker(ghost_dht, "test_run", target_batch_size=8, start=True, **FAST_TRACKER)
    ghost.report_local_progress(0, 1)
    model = torch.nn.Linear(8, 1)
    before = copy.deepcopy(model)
    opt = make_optimizer(trainer_dht, model, target_batch_size=8, averaging_timeout=3.0)
    handler = _RecordingHandler()
    logging.getLogger("hivemind.optim.optimizer").addHandler(handler)
    try:
        wait_for(lambda: opt.tracker.global_progress.num_peers == 2)
        x, y = torch.randn(8, 8), torch.randn(8, 1)
        started = time.monotonic()
        while opt.local_epoch < 1:
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step(batch_size=8)
        assert time.monotonic() - started < 3.0 + 2.0  # one averaging timeout, plus slack for a loaded machine
    finally:
        logging.getLogger("hivemind.optim.optimizer").removeHandler(handler)
        opt.shutdown()
        ghost.shutdown()
    assert any("averaging gradients failed" in message for message in handler.messages)
    reference_opt = torch.optim.SGD(before.parameters(), lr=0.1)
    torch.nn.functional.mse_loss(before(x), y).backward()
    reference_opt.step()
    for param, expected in zip(model.parameters(), before.parameters()):
        assert torch.allclose(param, expected, atol=1e-6)


@pytest.mark.timeout(90)
def test_an_auxiliary_peer_helps_average_without_changing_the_result(swarm):
    trainer_dht, helper_dht = swarm(2)
    torch.manual_seed(0)
    x, y = torch.randn(4, 8), torch.randn(4, 1)
    model, helper_model = torch.nn.Linear(8, 1), torch.nn.Linear(8, 1)
    initial_state = copy.deepcopy(model.state_dict())
    trainer = make_optimizer(trainer_dht, model, target_batch_size=8, verbose=True)
    helper = make_optimizer(
        helper_dht, helper_model, target_batch_size=8, batch_size_per_step=None, auxiliary=True, averaging_timeout=2.0
    )
    handler = _RecordingHandler()
    logging.getLogger("hivemind.optim.optimizer").addHandler(handler)
    stop = threading.Event()

    def help_forever():
        while not stop.is_set():
            helper.step()
            time.sleep(0.02)

    helper_thread = threading.Thread(target=help_forever)
    helper_thread.start()
    try:
        wait_for(lambda: trainer.tracker.global_progress.num_peers == 2)
        while trainer.local_epoch < 2:
            mse_step(model, trainer, x, y)
    finally:
        stop.set()
        trainer.shutdown()
        helper_thread.join(30)
        logging.getLogger("hivemind.optim.optimizer").removeHandler(handler)
        helper.shutdown()
    assert any("averaged gradients with 2 peers" in message for message in handler.messages)
    assert_like_local_training([model], initial_state, [(x, y)] * 2)


@pytest.mark.timeout(60)
def test_scheduler_is_stepped_once_per_epoch_not_per_step(swarm):
    (dht,) = swarm(1)
    model = torch.nn.Linear(8, 1)
    scheduler = functools.partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5)
    opt = make_optimizer(dht, model, target_batch_size=8, scheduler=scheduler)
    try:
        x, y = torch.randn(4, 8), torch.randn(4, 1)
        mse_step(model, opt, x, y)
        assert opt.local_epoch == 0 and opt.param_groups[0]["lr"] == pytest.approx(0.1)
        while opt.local_epoch < 2:
            mse_step(model, opt, x, y)
        assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**2)
    finally:
        opt.shutdown()
