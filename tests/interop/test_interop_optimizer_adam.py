"""hivemind.Optimizer with Adam takes the same steps in the original hivemind 1.1.12 and in ours.

Peers of both libraries apply the same averaged gradients in a mixed swarm, so their inner optimizers must turn
them into the same updates. Both initialize the optimizer's statistics with one zero-gradient step, which 1.1.12
counts (Adam's step counter starts at 1, so its first real step is bias-corrected as a second one): each side trains
alone here on the same data, and both must end with the same parameters.
"""

import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from .conftest import ORIGINAL, OURS, driver_per_side
from .harness import linear_parameters as parameters
from .harness import to_hex

pytestmark = [pytest.mark.interop, pytest.mark.timeout(120)]

OPTIMIZER_DRIVER = Path(__file__).resolve().with_name("optimizer_driver.py")
EPOCHS, BATCH, LR = 3, 4, 0.01


@pytest.fixture
def drivers(original_env, interop_log_dir):
    with driver_per_side(interop_log_dir, "optimizer-adam", OPTIMIZER_DRIVER) as started:
        yield started


def test_original_and_ours_take_the_same_adam_steps(drivers):
    torch.manual_seed(0)
    initial = torch.nn.Linear(8, 1)
    batches = [(to_hex(torch.randn(BATCH, 8)), to_hex(torch.randn(BATCH, 1))) for _ in range(EPOCHS)]
    requests = {}
    for side in (ORIGINAL, OURS):  # each alone in its own run: every step of BATCH samples ends an epoch
        dht = drivers[side].call("dht_create", timeout=60)
        handle = drivers[side].call(
            "optimizer_create", dht_handle=dht["handle"], timeout=60, run_id=f"adam_{side}_{uuid.uuid4().hex[:8]}",
            weight=to_hex(initial.weight), bias=to_hex(initial.bias), lr=LR, inner="adam", target_batch_size=BATCH,
            batch_size_per_step=BATCH, matchmaking_time=1.0, averaging_timeout=5.0,
        )  # fmt: skip
        requests[side] = drivers[side].submit(
            "optimizer_train", handle=handle, batches=batches, until_epoch=EPOCHS, batch_size=BATCH
        )
    results = {
        side: drivers[side].wait(request, timeout=90, cmd="optimizer_train") for side, request in requests.items()
    }
    assert all(result["epoch"] == EPOCHS for result in results.values()), results
    start = parameters({"weight": to_hex(initial.weight), "bias": to_hex(initial.bias)})
    moved = {side: parameters(result) - start for side, result in results.items()}
    assert np.abs(moved[ORIGINAL]).max() > LR  # it trained (steps of about LR each)
    np.testing.assert_allclose(moved[OURS], moved[ORIGINAL], rtol=1e-4, atol=1e-6)
