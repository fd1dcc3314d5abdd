"""A donor of ours whose state_compression is ScaledFloat16Compression (MEANSTD_16BIT) serves an original 1.1.12
newcomer a state with 0-d tensors (e.g. Adam's step counters): the original cannot decode a 0-d MEANSTD_16BIT tensor,
so such tensors are sent uncompressed (4 bytes instead of 10)."""

import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from .conftest import ORIGINAL, OURS, driver_per_side

pytestmark = [pytest.mark.interop, pytest.mark.timeout(120)]

DRIVER = Path(__file__).resolve().with_name("averaging_faults_driver.py")
SHAPES = [[300], [], [2, 5]]


@pytest.fixture
def drivers(original_env, interop_log_dir):
    with driver_per_side(interop_log_dir, "state-scalar-meanstd", DRIVER) as started:
        yield started


def test_original_newcomer_loads_a_meanstd_compressed_state_with_scalars_from_ours(drivers):
    first = drivers[ORIGINAL].call("dht_create", timeout=60)
    second = drivers[OURS].call("dht_create", initial_peers=first["maddrs"], timeout=60)
    prefix, rng = f"scalar_{uuid.uuid4().hex[:8]}", np.random.default_rng(5)
    state = [rng.standard_normal(shape).astype(np.float32) for shape in SHAPES]

    def create(side, dht, tensors, **options):
        return drivers[side].call(
            "averager_create_with", dht_handle=dht["handle"], tensors=[t.tobytes().hex() for t in tensors],
            shapes=SHAPES, prefix=prefix, timeout=60, **options,
        )  # fmt: skip

    create(OURS, second, state, state_compression="ScaledFloat16Compression", declare_state_period=1.0)
    receiver = create(ORIGINAL, first, [np.zeros(shape, np.float32) for shape in SHAPES])
    result, deadline = None, time.monotonic() + 30  # the donor declares itself in the background
    while result is None and time.monotonic() < deadline:
        request = drivers[ORIGINAL].submit("averager_load_state", handle=receiver, timeout=20)
        result = drivers[ORIGINAL].wait(request, timeout=60, cmd="averager_load_state")
        if result is None:
            time.sleep(0.5)
    assert result is not None, "the original newcomer could not load our state"
    for data, shape, want in zip(result["tensors"], result["shapes"], state):
        assert shape == list(want.shape)
        got = np.frombuffer(bytes.fromhex(data), dtype=np.float32).reshape(want.shape)
        assert np.abs(got - want).max() <= 1e-2 * max(1.0, np.abs(want).max())
    assert np.frombuffer(bytes.fromhex(result["tensors"][1]), dtype=np.float32)[0] == state[1]  # exact: uncompressed
