"""Set-up shared by the hivemind.Optimizer tests of options: DHTs on 127.0.0.1, optimizers with fast settings."""

import contextlib
import copy
import threading
import time
from typing import Callable, Iterator, List, Sequence, Tuple

import pytest
import torch
from averager_helpers import dht_swarm

from hivemind.dht import DHT
from hivemind.optim.optimizer import Optimizer
from hivemind.optim.progress_tracker import ProgressTracker
from hivemind.optim.state_averager import TrainingStateAverager
from hivemind.optim.training_averager import TrainingAverager

FAST_TRACKER = dict(min_refresh_period=0.05, max_refresh_period=0.3, default_refresh_period=0.1)


def wait_for(condition: Callable[[], bool], timeout: float = 15.0, interval: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)


def make_optimizer(
    dht: DHT, model: torch.nn.Module, run_id: str = "test_run", optimizer_class: type = Optimizer, **kwargs
) -> Optimizer:
    """An Optimizer (or a subclass) with SGD(lr=0.1), 8 samples per epoch in steps of 4, and quick matchmaking
    (both averagers: request_timeout=0.5); kwargs override."""
    options = dict(
        dht=dht, run_id=run_id, target_batch_size=8, batch_size_per_step=4,
        optimizer=lambda params: torch.optim.SGD(params, lr=0.1), params=model.parameters(),
        matchmaking_time=1.0, averaging_timeout=5.0, tracker_opts=FAST_TRACKER,
        averager_opts=dict(request_timeout=0.5),
    )  # fmt: skip
    options.update(kwargs)
    return optimizer_class(**options)


class StateAveragerOf1_1_12(Optimizer):
    """An Optimizer whose ``_make_state_averager`` builds its TrainingStateAverager with the arguments hivemind
    1.1.12's Optimizer gives it (as OpenDiLoCo's DiLoCoOptimizer does): none of this library's own, such as
    ``max_epoch_spread``."""

    def _make_state_averager(self, **kwargs) -> TrainingStateAverager:
        return TrainingStateAverager(
            dht=self.dht, prefix=f"{self.run_id}_state_averager", min_matchmaking_time=self.matchmaking_time,
            allreduce_timeout=self.allreduce_timeout, shutdown_timeout=self.shutdown_timeout,
            offload_optimizer=self.offload_optimizer, custom_gradients=self.offload_optimizer,
            status_loglevel=self.status_loglevel, next_chunk_timeout=self.next_chunk_timeout,
            client_mode=self.client_mode, auxiliary=self.auxiliary, start=True, **kwargs,
        )  # fmt: skip


@contextlib.contextmanager
def joined_optimizers(dhts: Sequence[DHT], models: Sequence[torch.nn.Module], **kwargs) -> Iterator[List[Optimizer]]:
    """``make_optimizer(dht, model, **kwargs)`` for each DHT and model, yielded once every peer's tracker sees all of
    them; each is shut down afterwards (which also applies a delayed optimizer step)."""
    opts: List[Optimizer] = []
    try:
        for dht, model in zip(dhts, models):
            opts.append(make_optimizer(dht, model, **kwargs))
        wait_for(lambda: all(opt.tracker.global_progress.num_peers == len(opts) for opt in opts))
        yield opts
    finally:
        for opt in opts:
            opt.shutdown()


@contextlib.contextmanager
def donor_then_newcomer(
    dhts: Sequence[DHT], models: Sequence[torch.nn.Module], epoch: int, batch, **donor_options
) -> Iterator[Tuple[Optimizer, Optimizer]]:
    """The first peer trains alone, an MSE step on ``batch`` at a time, until ``epoch``; then the second peer starts
    and loads the state from peers. Yields ``(donor, newcomer)``; both are shut down afterwards."""
    donor = make_optimizer(dhts[0], models[0], **donor_options)
    newcomer = None
    try:
        while donor.local_epoch < epoch:
            mse_step(models[0], donor, *batch)
        newcomer = make_optimizer(dhts[1], models[1])
        newcomer.load_state_from_peers()
        yield donor, newcomer
    finally:
        donor.shutdown()
        if newcomer is not None:
            newcomer.shutdown()


@pytest.fixture
def swarm():
    """``swarm(n)`` starts n more DHTs joined to the first one; all are shut down after the test."""
    dhts: List[DHT] = []

    def add(count: int) -> List[DHT]:
        for _ in range(count):
            initial_peers = dhts[0].get_visible_maddrs() if dhts else None
            dhts.append(DHT(initial_peers=initial_peers, start=True))
        return dhts[-count:]

    yield add
    for dht in dhts:
        dht.shutdown()


@pytest.fixture
def dht_pair() -> Iterator[List[DHT]]:
    """Two DHTs on 127.0.0.1, the second bootstrapped from the first (import this fixture into the test module)."""
    with dht_swarm(2) as dhts:
        yield dhts


@contextlib.contextmanager
def started_trackers(
    dhts: Sequence[DHT], target_batch_size: int, run_id: str = "run", **options
) -> Iterator[List[ProgressTracker]]:
    """One started ProgressTracker per DHT on one run, refreshing every 0.05 to 0.2 s unless ``options`` say
    otherwise; each is shut down afterwards."""
    options = {**dict(min_refresh_period=0.05, max_refresh_period=0.2, default_refresh_period=0.1), **options}
    trackers = []
    try:
        for dht in dhts:
            trackers.append(ProgressTracker(dht, run_id, target_batch_size=target_batch_size, start=True, **options))
        yield trackers
    finally:
        for tracker in trackers:
            tracker.shutdown(5)


class RegressionTask:
    """Two copies of one ``Linear(8, out_features)`` and a noiseless linear regression problem they should learn."""

    def __init__(self, out_features: int = 1, samples: int = 256):
        torch.manual_seed(0)
        true_weight = torch.randn(8, out_features)
        self.features = torch.randn(samples, 8)
        self.targets = self.features @ true_weight
        self.models = [torch.nn.Linear(8, out_features) for _ in range(2)]
        self.models[1].load_state_dict(self.models[0].state_dict())
        self.initial_loss = self.full_loss(self.models[0])

    def full_loss(self, model: torch.nn.Module) -> float:
        """Mean squared error of ``model`` over the whole data set."""
        with torch.no_grad():
            return torch.nn.functional.mse_loss(model(self.features), self.targets).item()

    def sample(self, generator: torch.Generator, batch_size: int = 4):
        rows = torch.randint(0, len(self.features), (batch_size,), generator=generator)
        return self.features[rows], self.targets[rows]

    def train_concurrently(self, opts: Sequence[Optimizer], epochs: int, timeout: float = 90.0) -> None:
        """Train each model with its optimizer in a thread of its own until every one reached ``epochs``; raises what
        a thread raised, or AssertionError if one did not get there within ``timeout``."""
        errors = []

        def train(model, opt, seed):
            try:
                generator = torch.Generator().manual_seed(seed)
                while opt.local_epoch < epochs:
                    x, y = self.sample(generator)
                    if not opt.reuse_grad_buffers:
                        opt.zero_grad()
                    torch.nn.functional.mse_loss(model(x), y).backward()
                    opt.step()
                    time.sleep(0.005)
            except BaseException as e:  # re-raised in the test's thread
                errors.append(e)

        threads = [threading.Thread(target=train, args=(m, o, i)) for i, (m, o) in enumerate(zip(self.models, opts))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout)
        if errors:
            raise errors[0]
        assert all(opt.local_epoch >= epochs for opt in opts), [opt.local_epoch for opt in opts]


def mse_step(model: torch.nn.Module, opt: Optimizer, x: torch.Tensor, y: torch.Tensor) -> float:
    opt.zero_grad()
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()
    opt.step()
    return loss.item()


def train_until_epoch(
    models: Sequence[torch.nn.Module], opts: Sequence[Optimizer], epoch: int, batches: Callable, timeout: float = 60
) -> None:
    """Each peer, in its own thread, steps on ``batches(peer_index, local_epoch)`` until it reaches ``epoch``."""
    errors, stop = [], threading.Event()

    def train(index: int) -> None:
        try:
            while opts[index].local_epoch < epoch and not stop.is_set():
                mse_step(models[index], opts[index], *batches(index, opts[index].local_epoch))
                time.sleep(0.01)
        except BaseException as e:  # reported by the test's thread
            errors.append(e)

    threads = [threading.Thread(target=train, args=(index,)) for index in range(len(opts))]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    stop.set()
    for thread in threads:
        thread.join(10)
    assert not errors, errors
    assert all(opt.local_epoch >= epoch for opt in opts), [opt.local_epoch for opt in opts]


def assert_like_local_training(
    models: Sequence[torch.nn.Module], initial_state: dict, batches: Sequence[Tuple[torch.Tensor, torch.Tensor]]
) -> None:
    """Each of ``models`` equals (up to float32 noise) a copy started from ``initial_state`` and trained here with
    SGD(lr=0.1), one MSE step on each of ``batches`` in turn: where peers end that averaged every epoch's gradients
    when each of their samples in epoch e came from ``batches[e]``."""
    reference = copy.deepcopy(models[0])
    reference.load_state_dict(initial_state)
    reference_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    for x, y in batches:
        reference_opt.zero_grad()
        torch.nn.functional.mse_loss(reference(x), y).backward()
        reference_opt.step()
    for model in models:
        for param, expected in zip(model.parameters(), reference.parameters()):
            assert torch.allclose(param, expected, atol=1e-6)


def parameter_averagers(
    params: Sequence[torch.nn.Parameter], dhts: Sequence[DHT], prefix: str, **kwargs
) -> List[TrainingAverager]:
    """One legacy TrainingAverager per (parameter, DHT) that averages its parameter only (around SGD with lr=0.1)."""
    return [
        TrainingAverager(
            torch.optim.SGD([param], lr=0.1),
            average_parameters=True,
            average_gradients=False,
            dht=dht,
            prefix=prefix,
            **kwargs,
        )
        for param, dht in zip(params, dhts)
    ]


def assert_rank_one_gradients_averaged(
    models: Sequence[torch.nn.Linear], averagers: Sequence, shared_column: torch.Tensor, rows, timeout: float
) -> None:
    """Give peer i's Linear the weight gradient ``shared_column @ rows[i]`` (rank one, so rank-1 PowerSGD loses
    nothing) and the bias gradient 1 or 3, accumulate it (4 samples), run one round of the gradient ``averagers``
    (each step within ``timeout``) and check that each then reads the exact mean."""
    for model, averager, row, bias_value in zip(models, averagers, rows, (1.0, 3.0)):
        model.weight.grad = shared_column @ row
        model.bias.grad = torch.full(model.bias.shape, bias_value)
        averager.accumulate_grads_(batch_size=4)
    controls = [averager.step(wait=False, timeout=timeout) for averager in averagers]
    for control in controls:
        assert len(control.result(timeout + 10)) == 2
    expected_weight = shared_column @ (rows[0] + rows[1]) / 2
    for model, averager in zip(models, averagers):
        with averager.use_averaged_gradients():
            assert torch.allclose(model.weight.grad, expected_weight, atol=1e-5)
            assert torch.allclose(model.bias.grad, torch.full(model.bias.shape, 2.0))
