"""A hivemind.Optimizer whose construction fails stops the averagers it had already started."""

import functools
import multiprocessing as mp
import threading

import pytest
import torch
from optim_swarm_helpers import make_optimizer, wait_for

from hivemind.dht import DHT
from hivemind.optim.optimizer import Optimizer
from hivemind.optim.power_sgd_averager import PowerSGDGradientAverager


def _averager_threads():
    return [thread for thread in threading.enumerate() if "Averager" in thread.name]


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "bad_option, error",
    [
        (dict(tracker_opts=dict(no_such_option=1)), TypeError),  # the tracker, made first
        (dict(grad_averager_factory=functools.partial(PowerSGDGradientAverager, averager_rank=0)), ValueError),
    ],
    ids=["tracker", "gradient-averager"],
)
def test_a_failed_construction_leaves_no_averager_running(bad_option, error):
    dht = DHT(start=True)
    try:
        children, threads = set(mp.active_children()), set(_averager_threads())
        with pytest.raises(error):
            make_optimizer(dht, torch.nn.Linear(4, 1), "failed_construction", **bad_option)
        wait_for(lambda: set(mp.active_children()) <= children, timeout=10)
        wait_for(lambda: set(_averager_threads()) <= threads, timeout=10)
    finally:
        dht.shutdown()


class UnhashableSchema(Optimizer):
    """A subclass whose _compute_schema_hash (a seam downstream optimizers override) fails: it runs once every part
    has started."""

    def _compute_schema_hash(self) -> int:
        type(self).tracker_made = self.tracker
        raise RuntimeError("no schema for these parameters")


@pytest.mark.timeout(30)
def test_a_failure_after_every_part_started_stops_the_averagers_and_the_tracker():
    dht = DHT(start=True)
    try:
        children, threads = set(mp.active_children()), set(_averager_threads())
        with pytest.raises(RuntimeError, match="no schema"):
            UnhashableSchema(
                dht=dht, run_id="failed_schema_hash", target_batch_size=8, batch_size_per_step=4,
                optimizer=lambda params: torch.optim.SGD(params, lr=0.1), params=torch.nn.Linear(4, 1).parameters(),
                matchmaking_time=1.0, averaging_timeout=5.0,
            )  # fmt: skip
        wait_for(lambda: set(mp.active_children()) <= children, timeout=10)
        wait_for(lambda: set(_averager_threads()) <= threads, timeout=10)
        assert not UnhashableSchema.tracker_made.is_alive()  # its record withdrawn, not left to count as a peer
    finally:
        dht.shutdown()
