"""use_local_updates steps the optimizer at every .step(), in the training thread: a delay_optimizer_step request is
ignored, and the user is told so."""

import logging

import torch
from allreduce_helpers import hivemind_logs

from hivemind.optim.optimizer_options import resolve_options

__all__ = ["hivemind_logs"]  # the fixture, used below


def test_delay_optimizer_step_with_local_updates_warns_that_it_has_no_effect(hivemind_logs):
    resolve_options(
        run_id="run", target_batch_size=32, batch_size_per_step=4, optimizer=lambda params: torch.optim.SGD(params),
        params=[torch.zeros(1)], scheduler=None, matchmaking_time=1.0, averaging_timeout=5.0, allreduce_timeout=None,
        next_chunk_timeout=None, reuse_grad_buffers=False, offload_optimizer=True, delay_optimizer_step=True,
        delay_grad_averaging=False, average_state_every=1, use_local_updates=True, client_mode=False,
        auxiliary=False, grad_averager_factory=None,
    )  # fmt: skip
    warnings = [r.getMessage() for r in hivemind_logs.records if r.levelno == logging.WARNING]
    assert any("delay_optimizer_step" in message and "use_local_updates" in message for message in warnings)
