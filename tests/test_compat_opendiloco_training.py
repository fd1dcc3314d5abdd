"""An OpenDiLoCo-style optimizer (written here from its public usage of hivemind) trains on this library: a
hivemind.Optimizer subclass with use_local_updates=True and offload_optimizer=True whose hook builds its own
TrainingStateAverager (as 1.1.12's _make_state_averager does), plus a DecentralizedAverager over
the offloaded optimizer's ``.grad`` that averages the pseudo-gradients (offloaded minus local parameters) once per
outer step, which the outer optimizer then applies with ``state_averager.step(increment_epoch=True,
optimizer_step=True)``. Two peers end each outer step with the same parameters; a late peer downloads them."""

import contextlib

import pytest
import torch
from optim_swarm_helpers import (
    FAST_TRACKER,
    RegressionTask,
    StateAveragerOf1_1_12,
    dht_pair,
    train_until_epoch,
    wait_for,
)

from hivemind.averaging.averager import DecentralizedAverager
from hivemind.dht import DHT

__all__ = ["dht_pair"]  # the fixture, used below


class PseudoGradientAverager(DecentralizedAverager):
    """Averages ``offloaded - local`` parameters in the offloaded optimizer's ``.grad`` buffers."""

    def __init__(self, main_parameters, offloaded_optimizer, dht, *, prefix, **kwargs):
        self.main_parameters, self.offloaded_optimizer = list(main_parameters), offloaded_optimizer
        for param in self._offloaded():
            if param.grad is None:
                param.grad = torch.zeros_like(param)
        super().__init__(averaged_tensors=[p.grad for p in self._offloaded()], dht=dht, prefix=prefix, **kwargs)

    def _offloaded(self):
        return [param for group in self.offloaded_optimizer.param_groups for param in group["params"]]

    @torch.no_grad()
    def load_pseudo_gradients(self) -> None:
        with self.get_tensors() as averaged:
            for buffer, offloaded, local in zip(averaged, self._offloaded(), self.main_parameters):
                buffer.copy_(offloaded - local.detach())

    def average(self, timeout: float) -> int:
        control = self.step(wait=False, require_trigger=True, timeout=timeout)
        self.load_pseudo_gradients()
        control.allow_allreduce()
        return len(control.result(timeout))


class OuterStepOptimizer(StateAveragerOf1_1_12):
    def __init__(self, *, inner_optimizer, params, **kwargs):
        params = list(params)
        self.inner_optimizer = inner_optimizer(params)
        super().__init__(params=params, use_local_updates=True, offload_optimizer=True, **kwargs)
        self.pseudo_grad_averager = PseudoGradientAverager(
            self.state_averager.main_parameters, self.state_averager.optimizer, self.dht,
            prefix=f"{self.run_id}_grad_averager", min_matchmaking_time=self.matchmaking_time,
            allreduce_timeout=self.allreduce_timeout, request_timeout=0.5, start=True,
        )  # fmt: skip
        self.group_sizes = []

    def step(self, closure=None, batch_size=None, grad_scaler=None):
        if self._should_load_state_from_peers():
            self.load_state_from_peers()
            return None
        self.inner_optimizer.step()
        samples = self.tracker.local_progress.samples_accumulated + self.batch_size_per_step
        self.tracker.report_local_progress(self.local_epoch, samples)
        if self.tracker.ready_to_update_epoch:
            if self.tracker.global_progress.num_peers > 1:
                self.group_sizes.append(self.pseudo_grad_averager.average(timeout=self.averaging_timeout))
            else:
                self.pseudo_grad_averager.load_pseudo_gradients()
            with self.tracker.pause_updates():
                self.state_averager.step(increment_epoch=True, optimizer_step=True, delay_optimizer_step=False)
                self.tracker.update_epoch(new_epoch=self.local_epoch)
            self._should_check_synchronization_on_update = True
        return None

    def shutdown(self) -> None:
        self.pseudo_grad_averager.shutdown()
        super().shutdown()


def make_outer_step_optimizer(dht: DHT, model: torch.nn.Module) -> OuterStepOptimizer:
    return OuterStepOptimizer(
        dht=dht, run_id="outer_steps", target_batch_size=20, batch_size_per_step=4, matchmaking_time=1.0,
        averaging_timeout=10.0, optimizer=lambda params: torch.optim.SGD(params, lr=0.7, momentum=0.9, nesterov=True),
        inner_optimizer=lambda params: torch.optim.AdamW(params, lr=0.05), params=model.parameters(),
        averager_opts=dict(request_timeout=0.5), tracker_opts=FAST_TRACKER,
    )  # fmt: skip


@pytest.mark.timeout(180)
def test_an_outer_step_optimizer_averages_pseudo_gradients_and_a_late_peer_downloads_the_state(dht_pair):
    task = RegressionTask()
    opts = []
    with contextlib.ExitStack() as stack:
        for dht, model in zip(dht_pair, task.models):
            opts.append(make_outer_step_optimizer(dht, model))
            stack.callback(opts[-1].shutdown)
        wait_for(lambda: all(opt.tracker.global_progress.num_peers == 2 for opt in opts))
        generators = [torch.Generator().manual_seed(index) for index in range(len(opts))]
        # (each peer's outer step waits for the other's average: they train in threads, an MSE step at a time)
        train_until_epoch(task.models, opts, 3, lambda index, _: task.sample(generators[index]), timeout=90)
        assert all(sizes and set(sizes) == {2} for sizes in (opt.group_sizes for opt in opts))
        for mine, theirs in zip(*(model.parameters() for model in task.models)):
            assert torch.allclose(mine, theirs, atol=1e-5)  # one outer step of the same average on each
        assert all(task.full_loss(model) < task.initial_loss / 2 for model in task.models)

        late_dht = DHT(initial_peers=dht_pair[0].get_visible_maddrs(), start=True)
        stack.callback(late_dht.shutdown)
        late_model = torch.nn.Linear(8, 1)
        late = make_outer_step_optimizer(late_dht, late_model)
        stack.callback(late.shutdown)
        late.load_state_from_peers()
        assert late.local_epoch == 3
        for mine, theirs in zip(late_model.parameters(), task.models[0].parameters()):
            assert torch.allclose(mine, theirs, atol=1e-5)
        momentum = [late.opt.state[param]["momentum_buffer"] for param in late.state_averager.optimizer_parameters]
        expected = [
            opts[0].opt.state[param]["momentum_buffer"] for param in opts[0].state_averager.optimizer_parameters
        ]
        assert all(torch.allclose(mine, theirs, atol=1e-6) for mine, theirs in zip(momentum, expected))
