"""An Optimizer subclass written for hivemind 1.1.12 may override _make_state_averager with the keywords 1.1.12 passes
and no **kwargs; the Optimizer must not pass it keywords of its own unless an option the user chose needs them."""

import pytest
import torch
from optim_swarm_helpers import FAST_TRACKER

import hivemind
from hivemind.optim.optimizer import Optimizer


class FixedSignatureOptimizer(Optimizer):
    def _make_state_averager(
        self, *, optimizer, params, scheduler, delta_rule_averaging, average_opt_statistics, extra_tensors,
        compression, state_compression, performance_ema_alpha,
    ):  # fmt: skip
        self.state_averager_made = True
        return super()._make_state_averager(
            optimizer=optimizer, params=params, scheduler=scheduler, delta_rule_averaging=delta_rule_averaging,
            average_opt_statistics=average_opt_statistics, extra_tensors=extra_tensors, compression=compression,
            state_compression=state_compression, performance_ema_alpha=performance_ema_alpha,
        )  # fmt: skip


@pytest.mark.timeout(120)
def test_an_override_with_the_keywords_of_1_1_12_and_no_kwargs_still_works():
    dht = hivemind.DHT(start=True)
    try:
        opt = FixedSignatureOptimizer(
            dht=dht, run_id="fixed_signature", target_batch_size=8, batch_size_per_step=4,
            optimizer=lambda params: torch.optim.SGD(params, lr=0.1), params=torch.nn.Linear(2, 1).parameters(),
            matchmaking_time=1.0, averaging_timeout=5.0, tracker_opts=FAST_TRACKER,
        )  # fmt: skip
        try:
            assert isinstance(opt, FixedSignatureOptimizer) and opt.state_averager_made
            assert opt.state_averager.max_epoch_spread == 0
        finally:
            opt.shutdown()
    finally:
        dht.shutdown()
