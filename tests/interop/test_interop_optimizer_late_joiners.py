"""A mixed hivemind.Optimizer swarm (original 1.1.12 + ours) agrees, and late joiners of both kinds catch up.

An original and our Optimizer train a Linear(8, 1) together for a few epochs, each on its own data, and end with the
same parameters (the gradients were averaged every epoch); then a new Optimizer of each kind joins
the same run and downloads the swarm's state from the trainer of the other implementation (the only one that shares
it then): it ends at the swarm's epoch with that donor's parameters.
"""

import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from .conftest import ORIGINAL, OURS, driver_per_side
from .harness import linear_parameters as parameters
from .harness import to_hex

pytestmark = [pytest.mark.interop, pytest.mark.timeout(180)]

DRIVER = Path(__file__).resolve().with_name("optimizer_late_joiner_driver.py")
EPOCHS, BATCH, LR = 3, 4, 0.1


@pytest.fixture
def drivers(original_env, interop_log_dir):
    with driver_per_side(interop_log_dir, "optimizer-late-joiners", DRIVER) as started:
        yield started


def test_mixed_optimizer_swarm_agrees_and_late_joiners_of_both_kinds_load_its_state(drivers):
    torch.manual_seed(0)
    initial = torch.nn.Linear(8, 1)
    # each side trains on its own data: only averaging makes their parameters equal
    batches = {
        side: [(to_hex(torch.randn(BATCH, 8)), to_hex(torch.randn(BATCH, 1))) for _ in range(EPOCHS)]
        for side in (ORIGINAL, OURS)
    }
    options = dict(
        run_id=f"r8late_{uuid.uuid4().hex[:8]}", weight=to_hex(initial.weight), bias=to_hex(initial.bias), lr=LR,
        target_batch_size=16, matchmaking_time=2.0, averaging_timeout=15.0,
        average_state_every=100,  # no background state averaging: what a donor shares is what its model holds
    )  # fmt: skip
    first = drivers[ORIGINAL].call("dht_create", timeout=60)
    dht = {ORIGINAL: first, OURS: drivers[OURS].call("dht_create", initial_peers=first["maddrs"], timeout=60)}
    trainers = {
        side: drivers[side].call("optimizer_create", dht_handle=dht[side]["handle"], timeout=60, **options)
        for side in (ORIGINAL, OURS)
    }
    # the original publishes its progress record only once it has samples to report (otherwise it trains alone,
    # counting only the other peer): each side reports one, then both see two peers before training
    for side in (ORIGINAL, OURS):
        drivers[side].call("optimizer_report", handle=trainers[side], samples=1)
    for side in (OURS, ORIGINAL):
        assert drivers[side].call("optimizer_wait_for_peers", handle=trainers[side], num_peers=2, timeout=40) == 2
    requests = {
        side: drivers[side].submit(
            "optimizer_train", handle=trainers[side], batches=batches[side], until_epoch=EPOCHS, batch_size=BATCH
        )
        for side in trainers
    }
    trained = {
        side: drivers[side].wait(request, timeout=150, cmd="optimizer_train") for side, request in requests.items()
    }
    assert all(result["epoch"] == EPOCHS for result in trained.values()), trained
    # what the trained peers now hold (a delayed state averaging may have changed them after training returned)
    held = {side: parameters(drivers[side].call("optimizer_params", handle=trainers[side])) for side in trainers}
    np.testing.assert_allclose(held[ORIGINAL], held[OURS], rtol=0, atol=1e-6, err_msg="the trainers disagree")
    assert not np.allclose(held[OURS], parameters({"weight": options["weight"], "bias": options["bias"]}))

    for side in (ORIGINAL, OURS):  # each joiner can only download from the trainer of the other implementation
        donor_side = OURS if side == ORIGINAL else ORIGINAL
        drivers[side].call("optimizer_share_state", handle=trainers[side], allow=False)
        drivers[donor_side].call("optimizer_share_state", handle=trainers[donor_side], allow=True)
        joiner_dht = drivers[side].call("dht_create", initial_peers=first["maddrs"], timeout=60)
        joiner = drivers[side].call("optimizer_create", dht_handle=joiner_dht["handle"], timeout=60, **options)
        drivers[side].call("optimizer_share_state", handle=joiner, allow=False)
        assert drivers[side].call("optimizer_load_state", handle=joiner, timeout=60) == EPOCHS, side
        loaded = drivers[side].call("optimizer_params", handle=joiner)
        assert loaded["epoch"] == EPOCHS
        np.testing.assert_allclose(parameters(loaded), held[donor_side], rtol=0, atol=1e-6, err_msg=f"{side} joiner")
