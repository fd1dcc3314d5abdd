"""Set-up shared by the hivemind.Optimizer tests of options: DHTs on 127.0.0.1, optimizers with fast settings."""

import threading
import time
from typing import Callable, List, Sequence

import pytest
import torch

from hivemind.dht import DHT
from hivemind.optim.optimizer import Optimizer

FAST_TRACKER = dict(min_refresh_period=0.05, max_refresh_period=0.3, default_refresh_period=0.1)


def wait_for(condition: Callable[[], bool], timeout: float = 15.0, interval: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)


def make_optimizer(dht: DHT, model: torch.nn.Module, run_id: str = "test_run", **kwargs) -> Optimizer:
    """An Optimizer with SGD(lr=0.1), 8 samples per epoch in steps of 4, and quick matchmaking; kwargs override."""
    options = dict(
        dht=dht, run_id=run_id, target_batch_size=8, batch_size_per_step=4,
        optimizer=lambda params: torch.optim.SGD(params, lr=0.1), params=model.parameters(),
        matchmaking_time=1.0, averaging_timeout=5.0, tracker_opts=FAST_TRACKER,
        averager_opts=dict(request_timeout=0.5),
    )  # fmt: skip
    options.update(kwargs)
    return Optimizer(**options)


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
