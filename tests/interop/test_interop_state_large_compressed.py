"""load_state_from_peers across implementations with a large state (multi-chunk: several MiB in 64 KiB
chunks) that the donor compresses per tensor (FLOAT16, UNIFORM_8BIT, NONE in one stream)."""

import time
import uuid
from pathlib import Path
from typing import Dict

import numpy as np
import pytest

from .conftest import DIRECTION_IDS, DIRECTIONS, ORIGINAL, OURS, driver_per_side
from .harness import PeerProcess

pytestmark = [pytest.mark.interop, pytest.mark.timeout(120)]

DRIVER = Path(__file__).resolve().with_name("averaging_faults_driver.py")
SHAPES = [[1_500_000], [1_000, 1_000], [7]]  # 6 MiB + 4 MiB of float32, and a small one
STATE_CODECS = ["Float16Compression", "Uniform8BitQuantization", "NoCompression"]
TOLERANCES = [1e-3, 0.1, 0.0]  # absolute, for standard normal values


@pytest.fixture(scope="module")
def drivers(original_env, interop_log_dir) -> Dict[str, PeerProcess]:
    with driver_per_side(interop_log_dir, "state-large-compressed", DRIVER) as started:
        yield started


@pytest.fixture(scope="module")
def dhts(drivers) -> Dict[str, dict]:
    first = drivers[ORIGINAL].call("dht_create", timeout=60)
    return {ORIGINAL: first, OURS: drivers[OURS].call("dht_create", initial_peers=first["maddrs"], timeout=60)}


@pytest.mark.parametrize("donor_side, receiver_side", DIRECTIONS, ids=DIRECTION_IDS)
def test_large_per_tensor_compressed_state_downloads_across_implementations(drivers, dhts, donor_side, receiver_side):
    prefix, rng = f"r8state_{uuid.uuid4().hex[:8]}", np.random.default_rng(21)
    state = [rng.standard_normal(shape).astype(np.float32) for shape in SHAPES]

    def create(side, tensors, **options):
        return drivers[side].call(
            "averager_create_with", dht_handle=dhts[side]["handle"], tensors=[t.tobytes().hex() for t in tensors],
            shapes=SHAPES, prefix=prefix, timeout=60, **options,
        )  # fmt: skip

    donor = create(donor_side, state, state_compression=STATE_CODECS, declare_state_period=1.0)
    drivers[donor_side].call("averager_set_priority", handle=donor, priority=5.0)
    receiver = create(receiver_side, [np.zeros(shape, np.float32) for shape in SHAPES])

    result, deadline = None, time.monotonic() + 30  # the donor declares itself in the background
    while result is None and time.monotonic() < deadline:
        request = drivers[receiver_side].submit("averager_load_state", handle=receiver, timeout=20)
        result = drivers[receiver_side].wait(request, timeout=60, cmd="averager_load_state")
        if result is None:
            time.sleep(0.5)
    assert result is not None, "the newcomer found no donor"
    assert result["shapes"] == SHAPES
    for index, (data, want, tolerance) in enumerate(zip(result["tensors"], state, TOLERANCES)):
        got = np.frombuffer(bytes.fromhex(data), dtype=np.float32).reshape(want.shape)
        error = np.abs(got - want)
        assert np.quantile(error, 0.99) <= tolerance and error.mean() <= tolerance / 4, (
            STATE_CODECS[index],
            error.max(),
        )
