"""A TrainingStateAverager made with initialize_optimizer=False loads a donor's state across implementations, whether
the donor has optimizer statistics (it trained) or none (made likewise, it has not stepped yet): ours takes either in
one download, and 1.1.12 takes ours."""

import uuid
from pathlib import Path

import pytest

from .conftest import ORIGINAL, OURS, driver_per_side

pytestmark = [pytest.mark.interop, pytest.mark.timeout(150)]

DRIVER = Path(__file__).resolve().with_name("state_load_driver.py")


@pytest.fixture
def drivers(original_env, interop_log_dir):
    with driver_per_side(interop_log_dir, "state-without-statistics", DRIVER) as started:
        yield started


@pytest.mark.parametrize("donor_trained", [False, True], ids=["donor_without_statistics", "donor_with_statistics"])
@pytest.mark.parametrize("donor_side", [ORIGINAL, OURS])
def test_newcomer_without_statistics_loads_the_other_implementations_state(drivers, donor_side, donor_trained):
    newcomer_side = OURS if donor_side == ORIGINAL else ORIGINAL
    donor_dht = drivers[donor_side].call("dht_create", timeout=60)
    newcomer_dht = drivers[newcomer_side].call("dht_create", initial_peers=donor_dht["maddrs"], timeout=60)
    prefix = f"nostat_{uuid.uuid4().hex[:8]}"
    donor = drivers[donor_side].call(
        "load_averager_create", dht_handle=donor_dht["handle"], prefix=prefix, seed=0, trained=donor_trained,
        epoch=3, declare_state_period=1.0, timeout=60,
    )  # fmt: skip
    newcomer = drivers[newcomer_side].call(
        "load_averager_create", dht_handle=newcomer_dht["handle"], prefix=prefix, seed=1, trained=False, timeout=60
    )
    drivers[newcomer_side].call("load_averager_wait_declared", handle=newcomer, timeout=60)
    attempts = drivers[newcomer_side].call("load_averager_load", handle=newcomer, load_timeout=20, timeout=60)
    donor_state = drivers[donor_side].call("load_averager_state", handle=donor)
    loaded = drivers[newcomer_side].call("load_averager_state", handle=newcomer)
    assert loaded["epoch"] == 3
    assert loaded["weight"] == donor_state["weight"] and loaded["bias"] == donor_state["bias"]
    if newcomer_side == OURS:
        assert attempts == 1  # one download, with or without statistics
        assert loaded["statistics"] == donor_state["statistics"]  # (none when the donor has none)
