"""A state round of TrainingStateAverager peers of the original 1.1.12 and of ours in different epochs: our member
behind the latest epoch averages with weight 0 (the original honours it: its peer in step keeps its own values),
while the original's straggler averages with its full weight, as the original always does (both then get the mean)."""

import uuid
from pathlib import Path

import pytest

from .conftest import ORIGINAL, OURS, driver_per_side

pytestmark = [pytest.mark.interop, pytest.mark.timeout(150)]

DRIVER = Path(__file__).resolve().with_name("state_averager_driver.py")


@pytest.fixture
def drivers(original_env, interop_log_dir):
    with driver_per_side(interop_log_dir, "state-round-straggler", DRIVER) as started:
        yield started


def _round(drivers, epochs, **extra):
    """One round of an original peer (value 1) and ours (value 3) at ``epochs`` (``extra``: options of both
    averagers); returns each side's values after."""
    first = drivers[ORIGINAL].call("dht_create", timeout=60)
    second = drivers[OURS].call("dht_create", initial_peers=first["maddrs"], timeout=60)
    options = dict(
        prefix=f"straggler_{uuid.uuid4().hex[:8]}", statistics=[], num_extras=0, target_group_size=2,
        min_matchmaking_time=3.0, request_timeout=1.0, **extra,
    )  # fmt: skip
    dht_handles = {ORIGINAL: first["handle"], OURS: second["handle"]}
    handles = {}
    for side, value in ((ORIGINAL, 1.0), (OURS, 3.0)):
        handles[side] = drivers[side].call(
            "state_averager_create", dht_handle=dht_handles[side], value=value, **options
        )
        drivers[side].call("state_averager_set_epoch", handle=handles[side], epoch=epochs[side])
    requests = {
        side: drivers[side].submit("state_averager_average", handle=handles[side], timeout=60) for side in handles
    }
    return {side: drivers[side].wait(requests[side], timeout=120, cmd="state_averager_average") for side in handles}


def test_our_straggler_does_not_pull_back_the_originals_peer_in_step(drivers):
    results = _round(drivers, {ORIGINAL: 5, OURS: 3})
    assert results[ORIGINAL] == [[1.0], [1.0]]  # its own values: our straggler's weight was 0
    assert results[OURS] == [[3.0], [3.0]]  # the straggler keeps its state (it refuses the round)


def test_the_originals_straggler_averages_with_its_full_weight(drivers):
    results = _round(drivers, {ORIGINAL: 3, OURS: 5})
    assert results == {ORIGINAL: [[2.0], [2.0]], OURS: [[2.0], [2.0]]}


def test_with_sync_epoch_when_averaging_our_member_behind_averages_with_full_weight_as_the_originals(drivers):
    # (that round aligns the epochs itself: 1.1.12 and ours both average as equals, then move to the latest epoch)
    results = _round(drivers, {ORIGINAL: 5, OURS: 3}, sync_epoch_when_averaging=True)
    assert results == {ORIGINAL: [[2.0], [2.0]], OURS: [[2.0], [2.0]]}
