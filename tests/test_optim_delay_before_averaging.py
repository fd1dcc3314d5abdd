"""TrainingStateAverager.delay_before_averaging: a running average of the seconds between a step() that asks for an
averaging round and the moment that round's all-reduce may start (the optimizer step and copying the state first)."""

import time

import pytest
import torch
from averager_helpers import dht_swarm

from hivemind.optim.state_averager import TrainingStateAverager
from hivemind.utils.performance_ema import PerformanceEMA

OPTIMIZER_STEP_SECONDS = 1.0


class SlowSGD(torch.optim.SGD):
    """An optimizer whose step takes a known time, like a large model's."""

    def step(self, closure=None):
        time.sleep(OPTIMIZER_STEP_SECONDS)
        return super().step(closure)


@pytest.mark.timeout(60)
def test_delay_before_averaging_measures_the_work_that_precedes_each_round():
    with dht_swarm(1) as (dht,):
        model = torch.nn.Linear(4, 2)
        averager = TrainingStateAverager(
            dht=dht, optimizer=lambda params: SlowSGD(params, lr=0.1), params=model.parameters(),
            offload_optimizer=True, performance_ema_alpha=0.5, prefix="delay_test", start=True,
            min_matchmaking_time=0.2, request_timeout=0.2,
        )  # fmt: skip
        try:
            assert isinstance(averager.delay_before_averaging, PerformanceEMA)
            assert averager.delay_before_averaging.alpha == 0.5 and averager.delay_before_averaging.num_updates == 0
            # this peer is alone: each round fails after its timeout, but only once it has been allowed to start
            round_options = dict(averaging_round=True, averaging_opts=dict(timeout=0.5))

            # a round without an optimizer step waits for nothing but copying the state into the averager
            averager.step(delay_averaging=False, **round_options)
            assert averager.delay_before_averaging.num_updates == 1
            assert averager.delay_before_averaging.ema_seconds_per_sample < OPTIMIZER_STEP_SECONDS

            # a delayed round goes after the delayed optimizer step, in the same background thread
            model(torch.ones(1, 4)).sum().backward()
            averager.step(optimizer_step=True, delay_optimizer_step=True, delay_averaging=True, **round_options)
            averager.step(wait_for_delayed_updates=True)
            assert averager.delay_before_averaging.num_updates == 2
            # alpha 0.5: the mean of one delay of OPTIMIZER_STEP_SECONDS or more and a small one is at least half of it
            assert averager.delay_before_averaging.ema_seconds_per_sample >= OPTIMIZER_STEP_SECONDS / 2
        finally:
            averager.shutdown()


@pytest.mark.timeout(60)
def test_delay_before_averaging_stays_in_the_users_process():
    with dht_swarm(1) as (dht,):
        model = torch.nn.Linear(4, 2)
        averager = TrainingStateAverager(
            dht=dht, optimizer=lambda params: torch.optim.SGD(params, lr=0.1), params=model.parameters(),
            prefix="delay_pickle_test", start=False,
        )  # fmt: skip
        state = averager.__getstate__()  # what a spawned averager process receives
        assert "delay_before_averaging" not in state  # it holds a lock, which cannot be pickled
        assert "_averaged_tensors" in state  # while what the averaging side needs does go
