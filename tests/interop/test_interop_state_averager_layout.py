"""TrainingStateAverager peers of the original 1.1.12 and of ours average optimizer statistics and extra tensors
together: both lay out the averaged tensors as parameters, statistics, extra tensors (the order is part of the schema
hash, so a different one would keep them from ever meeting in a group)."""

import uuid
from pathlib import Path

import pytest

from .conftest import ORIGINAL, OURS, driver_per_side

pytestmark = [pytest.mark.interop, pytest.mark.timeout(150)]

DRIVER = Path(__file__).resolve().with_name("state_averager_driver.py")


@pytest.fixture
def drivers(original_env, interop_log_dir):
    with driver_per_side(interop_log_dir, "state-averager-layout", DRIVER) as started:
        yield started


def test_statistics_and_extra_tensors_average_across_implementations(drivers):
    first = drivers[ORIGINAL].call("dht_create", timeout=60)
    second = drivers[OURS].call("dht_create", initial_peers=first["maddrs"], timeout=60)
    options = dict(
        prefix=f"layout_{uuid.uuid4().hex[:8]}", statistics=["exp_avg", "exp_avg_sq"], num_extras=2,
        target_group_size=2, min_matchmaking_time=3.0, request_timeout=1.0,
    )  # fmt: skip
    handles = {
        ORIGINAL: drivers[ORIGINAL].call("state_averager_create", dht_handle=first["handle"], value=1.0, **options),
        OURS: drivers[OURS].call("state_averager_create", dht_handle=second["handle"], value=3.0, **options),
    }
    requests = {
        side: drivers[side].submit("state_averager_average", handle=handles[side], timeout=60) for side in handles
    }
    results = {side: drivers[side].wait(requests[side], timeout=120, cmd="state_averager_average") for side in handles}
    for side, values in results.items():
        # 2 parameters, 2 statistics for each, 2 extra tensors: every one the mean of 1 and 3
        assert values == [[2.0]] * 8, (side, values)
