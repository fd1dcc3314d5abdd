"""A hivemind.Optimizer whose construction fails stops the averagers it had already started."""

import functools
import multiprocessing as mp
import threading

import pytest
import torch
from optim_swarm_helpers import make_optimizer, wait_for

from hivemind.dht import DHT
from hivemind.optim.power_sgd_averager import PowerSGDGradientAverager


def _averager_threads():
    return [thread for thread in threading.enumerate() if "Averager" in thread.name]


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "bad_option, error",
    [
        (dict(tracker_opts=dict(no_such_option=1)), TypeError),  # after both averagers started
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
