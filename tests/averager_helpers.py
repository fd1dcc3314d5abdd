"""Shared set-up for DecentralizedAverager tests: DHT swarms on 127.0.0.1 and averagers on top of them."""

import contextlib
import threading
import time
from typing import Iterator, List, Sequence

import torch

from hivemind.averaging.averager import DecentralizedAverager
from hivemind.dht import DHT

FAST = dict(min_matchmaking_time=1.0, request_timeout=0.5)  # quick matchmaking for tests on loopback


@contextlib.contextmanager
def dht_swarm(num_peers: int, client_mode: Sequence[bool] = (), **kwargs) -> Iterator[List[DHT]]:
    """``num_peers`` DHTs bootstrapped from the first; peer i is in client mode if ``client_mode[i]``."""
    dhts = [DHT(start=True, **kwargs)]
    try:
        initial_peers = dhts[0].get_visible_maddrs()
        for index in range(1, num_peers):
            is_client = index < len(client_mode) and client_mode[index]
            dhts.append(DHT(initial_peers=initial_peers, start=True, client_mode=is_client, **kwargs))
        yield dhts
    finally:
        for dht in dhts:
            dht.shutdown()


@contextlib.contextmanager
def averagers_on(
    dhts: Sequence[DHT], tensors: Sequence[Sequence[torch.Tensor]], prefix: str = "test", **kwargs
) -> Iterator[List[DecentralizedAverager]]:
    """One started averager per DHT, with ``tensors[i]`` for peer i; kwargs may be a list (one value per peer)."""
    averagers = []
    try:
        for index, (dht, peer_tensors) in enumerate(zip(dhts, tensors)):
            options = {**FAST, **{k: (v[index] if isinstance(v, list) else v) for k, v in kwargs.items()}}
            averagers.append(DecentralizedAverager(peer_tensors, dht, prefix=prefix, start=True, **options))
        yield averagers
    finally:
        for averager in averagers:
            averager.shutdown()


def wait_for_stage(controls, stage, timeout: float = 30.0) -> None:
    """Poll until every StepControl in ``controls`` is at ``stage`` (the stage is read from shared memory)."""
    deadline = time.monotonic() + timeout
    while any(control.stage != stage for control in controls):
        assert time.monotonic() < deadline, [control.stage for control in controls]
        time.sleep(0.01)


def run_allreduce(controls, timeout: float) -> float:
    """Allow the all-reduce of each StepControl (steps made with ``require_trigger=True``) and wait for each result;
    returns the seconds from the first trigger to the last result."""
    started = time.monotonic()
    for control in controls:
        control.allow_allreduce()
    for control in controls:
        control.result(timeout=timeout)
    return time.monotonic() - started


def weighted_mean(vectors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    total = sum(weights)
    return sum(w * v for w, v in zip(weights, vectors)) / total


def state_rounds_together(averagers, timeout: float = 20.0) -> None:
    """One state round (``TrainingStateAverager.step(averaging_round=True)``) of every averager, in threads at once;
    re-raises the first error a round raised."""
    errors = []

    def round_of(averager):
        try:
            averager.step(averaging_round=True, delay_averaging=False, averaging_opts=dict(timeout=timeout))
        except BaseException as e:  # reported by the calling thread
            errors.append(e)

    threads = [threading.Thread(target=round_of, args=(averager,)) for averager in averagers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(2 * timeout)
    assert not any(thread.is_alive() for thread in threads), f"a state round did not return within {2 * timeout} s"
    if errors:
        raise errors[0]
