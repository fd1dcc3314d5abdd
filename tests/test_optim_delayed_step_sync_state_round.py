"""
A delayed (background) optimizer step and a synchronous state-averaging round overlap when an Optimizer runs with
delay_optimizer_step but not delay_state_averaging: the step must survive the round's result being applied.
"""

import threading

import pytest
import torch
from averager_helpers import FAST, dht_swarm

from hivemind.optim.state_averager import TrainingStateAverager

LR = 0.5


@pytest.mark.timeout(60)
def test_a_delayed_step_finishing_during_a_synchronous_state_round_is_kept():
    with dht_swarm(2) as dhts:
        models = [torch.nn.Linear(4, 1) for _ in dhts]
        for model in models:
            for param in model.parameters():
                param.grad = torch.ones_like(param)
        with torch.no_grad():
            expected = [
                torch.stack(tensors).mean(0) - LR for tensors in zip(*(m.parameters() for m in models))
            ]  # the mean of the initial parameters, then one step with gradient 1
        averagers = [
            TrainingStateAverager(
                dht=dht,
                prefix="delayed_step_sync_round",
                optimizer=lambda p: torch.optim.SGD(p, lr=LR),
                params=model.parameters(),
                offload_optimizer=True,
                target_group_size=2,
                start=True,
                **FAST,
            )
            for dht, model in zip(dhts, models)
        ]
        errors = []

        def epoch_boundary(averager):
            try:
                release = threading.Event()
                averager.submit_background(release.wait, 30)  # the delayed step queues behind this

                def step_lands_mid_round():  # the state to average is already copied: let the step finish now
                    release.set()
                    averager.wait_for_background_step()

                averager.step(
                    optimizer_step=True,
                    delay_optimizer_step=True,
                    averaging_round=True,
                    delay_averaging=False,
                    wait_for_trigger=step_lands_mid_round,
                    averaging_opts=dict(timeout=20),
                )
                averager.step(wait_for_delayed_updates=True)
            except BaseException as e:  # reported by the test thread
                errors.append(e)

        try:
            threads = [threading.Thread(target=epoch_boundary, args=(averager,)) for averager in averagers]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(40)
            assert not errors, errors
            for model in models:
                for param, want in zip(model.parameters(), expected):
                    assert torch.allclose(param, want, atol=1e-6), (param, want)
        finally:
            for averager in averagers:
                averager.shutdown()
