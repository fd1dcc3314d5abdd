"""hivemind.Optimizer peers of the original hivemind 1.1.12 and of ours train one model together.

Each side runs in its own driver process (tests/interop/optimizer_driver.py). Both read each other's progress
records under the same DHT keys, average in the same groups, reach the same epoch, and training makes progress.
"""

import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from .conftest import ORIGINAL, OURS, driver_per_side

pytestmark = [pytest.mark.interop, pytest.mark.timeout(180)]

OPTIMIZER_DRIVER = Path(__file__).resolve().with_name("optimizer_driver.py")
EPOCHS, BATCH, LR = 3, 4, 0.1


def to_hex(tensor: torch.Tensor) -> str:
    return tensor.detach().to(torch.float32).contiguous().numpy().tobytes().hex()


def from_hex(data: str) -> np.ndarray:
    return np.frombuffer(bytes.fromhex(data), dtype=np.float32)


@pytest.fixture
def drivers(original_env, interop_log_dir):
    with driver_per_side(interop_log_dir, "optimizer", OPTIMIZER_DRIVER) as started:
        yield started


def test_original_and_ours_train_together_and_agree_on_epoch_and_parameters(drivers):
    torch.manual_seed(0)
    initial = torch.nn.Linear(8, 1)
    batches = [(torch.randn(BATCH, 8), torch.randn(BATCH, 1)) for _ in range(EPOCHS)]
    run_id = f"interop_{uuid.uuid4().hex[:8]}"

    first = drivers[ORIGINAL].call("dht_create", timeout=60)
    second = drivers[OURS].call("dht_create", initial_peers=first["maddrs"], timeout=60)
    options = dict(
        run_id=run_id, weight=to_hex(initial.weight), bias=to_hex(initial.bias), lr=LR, target_batch_size=32,
        matchmaking_time=2.0, averaging_timeout=15.0,
    )  # fmt: skip
    handles = {
        ORIGINAL: drivers[ORIGINAL].call("optimizer_create", dht_handle=first["handle"], timeout=60, **options),
        OURS: drivers[OURS].call("optimizer_create", dht_handle=second["handle"], timeout=60, **options),
    }
    # the original publishes its progress only once it has samples to report, so peers meet while training
    assert drivers[ORIGINAL].call("optimizer_wait_for_peers", handle=handles[ORIGINAL], num_peers=1, timeout=40)

    batches_hex = [(to_hex(x), to_hex(y)) for x, y in batches]
    requests = {
        side: drivers[side].submit(
            "optimizer_train", handle=handles[side], batches=batches_hex, until_epoch=EPOCHS, batch_size=BATCH
        )
        for side in (ORIGINAL, OURS)
    }
    results = {side: drivers[side].wait(requests[side], timeout=150, cmd="optimizer_train") for side in requests}

    for side in (ORIGINAL, OURS):  # each side reads the other's progress record (same keys, signatures, schema)
        assert drivers[side].call("optimizer_wait_for_peers", handle=handles[side], num_peers=2, timeout=30) == 2

    features = torch.cat([x for x, _ in batches])
    targets = torch.cat([y for _, y in batches])

    def loss(weight: np.ndarray, bias: np.ndarray) -> float:
        prediction = features @ torch.from_numpy(weight.copy()).reshape(8, 1) + torch.from_numpy(bias.copy())
        return torch.nn.functional.mse_loss(prediction, targets).item()

    initial_loss = loss(initial.weight.detach().numpy().ravel(), initial.bias.detach().numpy())
    for side, result in results.items():
        assert result["epoch"] == EPOCHS, side
        # not bit-exact: the original may run an epoch alone before it sees the other peer (its rule), so the two
        # sides can average gradients of neighbouring epochs; training must still make progress
        assert loss(from_hex(result["weight"]), from_hex(result["bias"])) < initial_loss, side
