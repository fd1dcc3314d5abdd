"""
The optim averagers started with the ``spawn`` method (the CUDA-safe one): their processes receive only the averaging
side (the model, the optimizer, its scheduler and lambdas stay in the user's process) and share the averaged tensors.
Each spawned process imports torch, so every test here takes a few seconds per averager.
"""

import functools
import threading
import time

import pytest
import torch
from averager_helpers import FAST, dht_swarm
from optim_swarm_helpers import assert_like_local_training, assert_rank_one_gradients_averaged, parameter_averagers

from hivemind.averaging.averager import DecentralizedAverager
from hivemind.optim.grad_averager import GradientAverager
from hivemind.optim.optimizer import Optimizer
from hivemind.optim.power_sgd_averager import PowerSGDGradientAverager
from hivemind.optim.state_averager import TrainingStateAverager
from hivemind.optim.training_averager import TrainingAverager

SPAWN = dict(FAST, start_method="spawn")
READY_TIMEOUT = 150  # seconds for a spawned process to import torch and hivemind on a busy machine


def start_all(averagers):
    """Start the averagers' processes together (each spawn takes seconds), then wait until all of them run."""
    for averager in averagers:
        averager.run_in_background(await_ready=False)
    for averager in averagers:
        averager.wait_until_ready(READY_TIMEOUT)
    return averagers


def run_in_threads(function, *argument_lists, timeout: float = 40):
    """Call ``function(*arguments)`` for each argument list at once (the peers of a round block until all join)."""
    results, errors = {}, []

    def call(index, arguments):
        try:
            results[index] = function(*arguments)
        except BaseException as e:  # reported by the test thread
            errors.append(e)

    threads = [threading.Thread(target=call, args=item) for item in enumerate(argument_lists)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    assert not errors, errors
    assert len(results) == len(argument_lists), "a peer did not finish in time"
    return [results[index] for index in range(len(argument_lists))]


@pytest.fixture(scope="module")
def state_averagers():
    """Two spawned TrainingStateAveragers whose optimizer and scheduler are built by lambdas (which cannot be pickled),
    with Adam's exp_avg_sq averaged too."""
    with dht_swarm(2) as dhts:
        models = [torch.nn.Linear(3, 2) for _ in dhts]
        averagers = [
            TrainingStateAverager(
                dht=dht,
                prefix="spawned_state",
                params=model.parameters(),
                optimizer=lambda params: torch.optim.Adam(params, lr=0.1),
                scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 1.0),
                offload_optimizer=True,
                average_opt_statistics=("exp_avg_sq",),
                target_group_size=2,
                start=False,
                **SPAWN,
            )  # fmt: skip
            for dht, model in zip(dhts, models)
        ]
        try:
            yield models, start_all(averagers)
        finally:
            for averager in averagers:
                averager.shutdown()


@pytest.mark.timeout(240)
def test_spawned_state_averagers_average_parameters_and_optimizer_statistics(state_averagers):
    models, averagers = state_averagers
    assert not any(param.is_shared() for model in models for param in model.parameters())  # the model was not sent
    for value, model, averager in zip((1.0, 3.0), models, averagers):
        with torch.no_grad():
            for param, offloaded in zip(model.parameters(), averager.optimizer_parameters):
                param.fill_(value)
                offloaded.fill_(value)
                averager.optimizer.state[offloaded]["exp_avg_sq"].fill_(10 * value)

    def average(averager):
        averager.step(averaging_round=True, averaging_opts=dict(timeout=20))

    run_in_threads(average, *([averager] for averager in averagers))
    for model, averager in zip(models, averagers):
        for param, offloaded in zip(model.parameters(), averager.optimizer_parameters):
            assert torch.equal(param, torch.full_like(param, 2.0))
            assert torch.equal(averager.optimizer.state[offloaded]["exp_avg_sq"], torch.full_like(param, 20.0))


@pytest.mark.timeout(240)
@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler:UserWarning")  # the scheduler catches up the epochs
def test_spawned_state_averager_loads_the_state_of_a_peer(state_averagers):
    models, (donor, newcomer) = state_averagers
    with torch.no_grad():
        for offloaded in donor.optimizer_parameters:
            offloaded.fill_(7.0)
            donor.optimizer.state[offloaded]["exp_avg"].fill_(-1.0)
    donor.local_epoch = max(donor.local_epoch, newcomer.local_epoch) + 3

    metadata, _ = newcomer.load_state_from_peers(timeout=20)
    assert metadata["epoch"] == newcomer.local_epoch == donor.local_epoch
    for param, offloaded in zip(models[1].parameters(), newcomer.optimizer_parameters):
        assert torch.equal(param, torch.full_like(param, 7.0))  # the model gets the downloaded values too
        assert torch.equal(newcomer.optimizer.state[offloaded]["exp_avg"], torch.full_like(param, -1.0))
    assert newcomer.scheduler.last_epoch == newcomer.local_epoch


@pytest.mark.timeout(240)
@pytest.mark.parametrize("averager_type", [GradientAverager, PowerSGDGradientAverager])
def test_spawned_gradient_averagers_average_gradients(averager_type):
    shared_column = torch.linspace(-1, 1, 16).reshape(16, 1)
    rows = [torch.linspace(0, 1, 8).reshape(1, 8), torch.linspace(2, -3, 8).reshape(1, 8)]
    rank = (1,) if averager_type is PowerSGDGradientAverager else ()
    with dht_swarm(2) as dhts:
        models = [torch.nn.Linear(8, 16) for _ in dhts]
        averagers = [
            averager_type(model.parameters(), *rank, dht=dht, prefix="spawned_grads", start=False, **SPAWN)
            for model, dht in zip(models, dhts)
        ]
        try:
            start_all(averagers)
            for model, averager in zip(models, averagers):  # nothing of the model was sent (pickling shares memory)
                assert not any(tensor.is_shared() for tensor in [*model.parameters(), *averager._accumulators])
            assert_rank_one_gradients_averaged(models, averagers, shared_column, rows, timeout=20)
        finally:
            for averager in averagers:
                averager.shutdown()


@pytest.mark.timeout(240)
def test_spawned_legacy_training_averagers_average_parameters():
    params = [torch.nn.Parameter(torch.full((2,), value)) for value in (0.0, 2.0)]
    with dht_swarm(2) as dhts:
        averagers = parameter_averagers(params, dhts, prefix="spawned_legacy", start=False, **SPAWN)
        try:
            start_all(averagers)
            futures = [averager.step(wait=False, timeout=20) for averager in averagers]
            for future in futures:
                assert len(future.result(30)) == 2
            for param in params:
                assert torch.equal(param, torch.ones(2))
        finally:
            for averager in averagers:
                averager.shutdown()


@pytest.mark.timeout(480)
def test_two_spawned_optimizers_train_like_local_training_and_end_at_the_same_epoch():
    epochs = 2
    torch.manual_seed(0)
    data = [(torch.randn(4, 8), torch.randn(4, 1)) for _ in range(epochs)]
    initial_state = torch.nn.Linear(8, 1).state_dict()
    models = [torch.nn.Linear(8, 1) for _ in range(2)]
    for model in models:
        model.load_state_dict(initial_state)

    def make_optimizer(dht, model):
        return Optimizer(
            dht=dht, run_id="spawned_run", target_batch_size=16, batch_size_per_step=4, params=model.parameters(),
            optimizer=lambda params: torch.optim.SGD(params, lr=0.1), matchmaking_time=1.0, averaging_timeout=10.0,
            tracker_opts=dict(min_refresh_period=0.05, max_refresh_period=0.3, default_refresh_period=0.1),
            averager_opts=dict(request_timeout=0.5, start_method="spawn"),  # (start_method: both averagers)
            grad_averager_factory=functools.partial(GradientAverager, request_timeout=0.5),
        )  # fmt: skip

    def train(model, opt):  # every sample of epoch e is data[e], so any split between peers gives the same mean
        while opt.local_epoch < epochs:
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(data[opt.local_epoch][0]), data[opt.local_epoch][1]).backward()
            opt.step()
            time.sleep(0.01)

    with dht_swarm(2) as dhts:
        opts = [None, None]

        def start_peer(index):  # both at once: each peer spawns two averager processes
            opts[index] = make_optimizer(dhts[index], models[index])

        try:
            run_in_threads(start_peer, [0], [1], timeout=2 * READY_TIMEOUT)
            for opt in opts:  # averager_opts' start_method reaches both averagers
                for averager in (opt.state_averager, opt.grad_averager):
                    assert averager._context.get_start_method() == "spawn"
            run_in_threads(train, *zip(models, opts), timeout=120)
            assert [opt.local_epoch for opt in opts] == [epochs, epochs]
        finally:
            for opt in opts:
                if opt is not None:
                    opt.shutdown()

    assert_like_local_training(models, initial_state, data)  # one step per epoch on that epoch's batch


def test_optim_averagers_default_to_the_start_method_of_decentralized_averager():
    with dht_swarm(1) as (dht,):
        model = torch.nn.Linear(2, 1)
        averagers = [
            DecentralizedAverager([torch.zeros(1)], dht, prefix="default_method", start=False),
            TrainingStateAverager(dht=dht, prefix="default_method", optimizer=torch.optim.SGD(model.parameters(), 1),
                                  start=False),
            GradientAverager(model.parameters(), dht=dht, prefix="default_method", start=False),
            TrainingAverager(torch.optim.SGD(model.parameters(), 1), average_parameters=True, average_gradients=False,
                             dht=dht, prefix="default_method", start=False),
        ]  # fmt: skip
        assert {averager._start_method for averager in averagers} == {None}
