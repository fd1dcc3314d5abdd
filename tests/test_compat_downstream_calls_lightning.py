"""hivemind.Optimizer built the way lightning-hivemind 0.1.0's HivemindStrategy builds it, trained by two peers.

HivemindStrategy passes ``averaging_timeout`` through (its users may set None, and then it also passes
``averager_opts={"request_timeout": 1.0}``), ``delay_optimizer_step=None``, ``offload_optimizer=None``, a torch
optimizer instance with ``params=None`` and ``scheduler=None``, calls ``load_state_from_peers()`` before training,
``step(closure=...)`` and ``zero_grad(set_to_none=True)`` on each batch, and reads
``tracker.global_progress.num_peers`` and ``local_epoch``. ``averaging_timeout=None`` (or inf) means no limit on an
averaging round."""

import math
import threading

import pytest
import torch
from optim_swarm_helpers import FAST_TRACKER, RegressionTask, wait_for

import hivemind
from hivemind.averaging import DecentralizedAverager


def lightning_optimizer(dht, model, averaging_timeout):
    optimizer_kwargs = dict(
        matchmaking_time=0.5,
        averaging_timeout=averaging_timeout,
        delay_optimizer_step=None,
        delay_state_averaging=False,
        delay_grad_averaging=False,
        offload_optimizer=None,
        averager_opts=None if averaging_timeout is not None else {"request_timeout": 1.0},
        verbose=False,
        reuse_grad_buffers=False,
        tracker_opts=FAST_TRACKER,  # (one of HivemindStrategy's **optimizer_kwargs)
    )
    return hivemind.Optimizer(
        dht=dht,
        run_id=f"lightning_run_{averaging_timeout}",
        params=None,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.2),
        scheduler=None,
        target_batch_size=16,
        batch_size_per_step=4,
        **optimizer_kwargs,
    )


@pytest.fixture(scope="module")
def dht_pair():
    first = hivemind.DHT(start=True)
    second = hivemind.DHT(initial_peers=first.get_visible_maddrs(), start=True)
    yield first, second
    second.shutdown()
    first.shutdown()


@pytest.mark.timeout(90)
@pytest.mark.parametrize("averaging_timeout", [None, math.inf])
def test_two_lightning_peers_average_with_no_averaging_timeout(dht_pair, averaging_timeout):
    task = RegressionTask()
    opts = [lightning_optimizer(dht, model, averaging_timeout) for dht, model in zip(dht_pair, task.models)]
    try:
        for opt in opts:
            opt.load_state_from_peers()
        wait_for(lambda: all(opt.tracker.global_progress.num_peers == 2 for opt in opts), timeout=30)
        errors = []

        def train(index):
            model, opt = task.models[index], opts[index]
            generator = torch.Generator().manual_seed(index)
            try:
                while opt.local_epoch < 2:
                    x, y = task.sample(generator)

                    def closure(x=x, y=y):
                        loss = torch.nn.functional.mse_loss(model(x), y)
                        loss.backward()
                        return loss

                    opt.step(closure=closure)
                    opt.zero_grad(set_to_none=True)
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=train, args=(index,)) for index in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert not errors, errors
        assert [opt.local_epoch for opt in opts] == [2, 2]
        # each epoch averaged the gradients of both peers and then their parameters: the two models are the same
        for first, second in zip(*(model.parameters() for model in task.models)):
            assert torch.allclose(first, second, atol=1e-6)
    finally:
        for opt in opts:
            opt.shutdown()
    for model in task.models:
        assert task.full_loss(model) < task.initial_loss


@pytest.mark.timeout(60)
def test_an_averager_step_with_an_infinite_timeout_averages(dht_pair):
    averagers = [
        DecentralizedAverager([torch.full((3,), value)], dht, start=True, prefix="inf_step", target_group_size=2)
        for value, dht in zip((1.0, 3.0), dht_pair)
    ]
    try:
        controls = [averager.step(wait=False, timeout=math.inf) for averager in averagers]
        assert all(len(control.result(30)) == 2 for control in controls)
        for averager in averagers:
            with averager.get_tensors() as (tensor,):
                assert torch.allclose(tensor, torch.full((3,), 2.0))
    finally:
        for averager in averagers:
            averager.shutdown()
