"""hivemind.Optimizer's batch_size_per_step is checked like step(batch_size=...): the same values pass or fail."""

import numpy as np
import pytest
import torch

from hivemind.optim.optimizer_options import resolve_options


def resolve(batch_size_per_step):
    return resolve_options(
        run_id="run", target_batch_size=64, batch_size_per_step=batch_size_per_step,
        optimizer=lambda params: torch.optim.SGD(params, lr=0.1), params=[torch.nn.Parameter(torch.zeros(3))],
        scheduler=None, matchmaking_time=1.0, averaging_timeout=5.0, allreduce_timeout=None, next_chunk_timeout=None,
        reuse_grad_buffers=False, offload_optimizer=None, delay_optimizer_step=None, delay_grad_averaging=False,
        average_state_every=1, use_local_updates=False, client_mode=False, auxiliary=False, grad_averager_factory=None,
    )  # fmt: skip


@pytest.mark.parametrize("batch_size_per_step", [0, -4, True, 2.5, "4"])
def test_a_batch_size_per_step_that_is_not_a_positive_int_is_refused_at_construction(batch_size_per_step):
    with pytest.raises(ValueError, match="batch_size_per_step must be"):
        resolve(batch_size_per_step)


@pytest.mark.parametrize("batch_size_per_step", [None, 4, np.int64(4)])
def test_a_positive_integer_batch_size_per_step_or_none_is_accepted(batch_size_per_step):
    resolve(batch_size_per_step)
