"""Mixed averaging groups of the original hivemind 1.1.12 and ours.

Each side runs in its own driver process (tests/interop/averaging_driver.py) with its own DHT nodes and averagers;
our nodes bootstrap from the original's. A pair averages with either side as the group's leader, a group of four
(two of each) averages with weights, and a newcomer of one side downloads the state of a donor of the other side.
"""

import time
import uuid
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest

from .conftest import DIRECTION_IDS, DIRECTIONS, ORIGINAL, OURS, SIDE_IMPLEMENTATION, driver_per_side
from .harness import PeerProcess

pytestmark = [pytest.mark.interop, pytest.mark.timeout(120)]

AVERAGING_DRIVER = Path(__file__).resolve().with_name("averaging_driver.py")
SHAPES = [[300_000], [3, 4]]  # the first one is cut into several parts (512 KiB each)
OPTIONS = dict(min_matchmaking_time=2.0, request_timeout=1.0)
STEP_TIMEOUT = 30


@pytest.fixture(scope="module")
def drivers(original_env, interop_log_dir) -> Dict[str, PeerProcess]:
    with driver_per_side(interop_log_dir, "averaging", AVERAGING_DRIVER) as started:
        yield started


@pytest.fixture(scope="module")
def dhts(drivers) -> Dict[str, List[dict]]:
    """Two DHT nodes per side; ours join through the original's first node."""
    original_first = drivers[ORIGINAL].call("dht_create", timeout=60)
    nodes = {ORIGINAL: [original_first], OURS: []}
    nodes[ORIGINAL].append(drivers[ORIGINAL].call("dht_create", initial_peers=original_first["maddrs"], timeout=60))
    for _ in range(2):
        nodes[OURS].append(drivers[OURS].call("dht_create", initial_peers=original_first["maddrs"], timeout=60))
    return nodes


def random_tensors(rng: np.random.Generator) -> List[np.ndarray]:
    return [rng.standard_normal(shape).astype(np.float32) for shape in SHAPES]


def to_hex(tensors: List[np.ndarray]) -> List[str]:
    return [tensor.tobytes().hex() for tensor in tensors]


def from_hex(data: List[str]) -> List[np.ndarray]:
    return [np.frombuffer(bytes.fromhex(item), dtype=np.float32).reshape(shape) for item, shape in zip(data, SHAPES)]


class Member:
    def __init__(self, drivers, dhts, side: str, index: int, prefix: str, tensors: List[np.ndarray], **options):
        self.driver, self.side, self.tensors = drivers[side], side, tensors
        self.peer_id = dhts[side][index]["peer_id"]
        self.handle = self.driver.call(
            "averager_create",
            dht_handle=dhts[side][index]["handle"],
            tensors=to_hex(tensors),
            shapes=SHAPES,
            prefix=prefix,
            timeout=60,
            **OPTIONS,
            **options,
        )

    def submit_step(self, **args) -> int:
        return self.driver.submit("averager_step", handle=self.handle, timeout=STEP_TIMEOUT, **args)

    def wait(self, request_id: int) -> dict:
        return self.driver.wait(request_id, timeout=STEP_TIMEOUT + 30, cmd="averager_step")

    def current_tensors(self) -> List[np.ndarray]:
        return from_hex(self.driver.call("averager_tensors", handle=self.handle))


def check_average(member: Member, expected: List[np.ndarray]) -> None:
    """The member's tensors equal the expected average (float32 rounding differs with who reduced a part)."""
    for got, want in zip(member.current_tensors(), expected):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def our_log(drivers) -> str:
    return drivers[OURS].log_path.read_text(errors="replace")


@pytest.mark.parametrize("leader", [ORIGINAL, OURS])
def test_mixed_pair_averages_with_either_side_leading(drivers, dhts, leader):
    prefix, rng = f"interop_pair_{uuid.uuid4().hex[:8]}", np.random.default_rng(1)
    members = {side: Member(drivers, dhts, side, 0, prefix, random_tensors(rng), target_group_size=2) for side in dhts}
    follower = OURS if leader == ORIGINAL else ORIGINAL
    log_start = len(our_log(drivers))
    # the earlier declared time makes the leader; the follower then asks it to join
    requests = {
        leader: members[leader].submit_step(gather=leader, scheduled_delay=3.0),
        follower: members[follower].submit_step(gather=follower, scheduled_delay=8.0),
    }
    gathered = {side: members[side].wait(request) for side, request in requests.items()}
    expected_gathered = {members[side].peer_id: side for side in members}
    assert gathered[ORIGINAL] == gathered[OURS] == expected_gathered

    expected = [(a + b) / 2 for a, b in zip(members[ORIGINAL].tensors, members[OURS].tensors)]
    for member in members.values():
        check_average(member, expected)

    if SIDE_IMPLEMENTATION[OURS] == "ours":  # our matchmaking logs who led the group
        log = our_log(drivers)[log_start:]
        if leader == OURS:
            assert "led by this peer" in log, f"our averager should have led the group; log:\n{log[-3000:]}"
        else:
            leader_id = members[ORIGINAL].peer_id
            assert f"led by {leader_id}" in log, f"our averager should have joined {leader_id}; log:\n{log[-3000:]}"


def test_mixed_group_of_four_averages_with_weights(drivers, dhts):
    prefix, rng = f"interop_four_{uuid.uuid4().hex[:8]}", np.random.default_rng(2)
    members = [
        Member(drivers, dhts, side, index, prefix, random_tensors(rng), target_group_size=4)
        for side in (ORIGINAL, OURS)
        for index in range(2)
    ]
    weights = [1.0, 2.0, 3.0, 4.0]
    requests = [
        member.submit_step(gather=number, weight=weight, scheduled_delay=3.0)
        for number, (member, weight) in enumerate(zip(members, weights))
    ]
    results = [member.wait(request) for member, request in zip(members, requests)]
    expected_gathered = {member.peer_id: number for number, member in enumerate(members)}
    assert all(result == expected_gathered for result in results)

    total = sum(weights)
    expected = [
        sum(weight * member.tensors[i] for weight, member in zip(weights, members)) / total for i in range(len(SHAPES))
    ]
    for member in members:
        check_average(member, expected)


@pytest.mark.parametrize("donor_side, receiver_side", DIRECTIONS, ids=DIRECTION_IDS)
def test_state_download_across_implementations(drivers, dhts, donor_side, receiver_side):
    prefix, rng = f"interop_state_{uuid.uuid4().hex[:8]}", np.random.default_rng(3)
    donor = Member(drivers, dhts, donor_side, 0, prefix, random_tensors(rng))
    drivers[donor_side].call("averager_set_priority", handle=donor.handle, priority=5.0)
    receiver = Member(drivers, dhts, receiver_side, 1, prefix, random_tensors(rng))

    # the donor declares itself in the background: poll until its declaration is visible
    result, deadline = None, time.monotonic() + 30
    while result is None and time.monotonic() < deadline:
        request = drivers[receiver_side].submit("averager_load_state", handle=receiver.handle, timeout=10)
        result = drivers[receiver_side].wait(request, timeout=40, cmd="averager_load_state")
        if result is None:
            time.sleep(0.5)
    assert result is not None, "the newcomer found no donor"
    assert result["metadata"] == {"group_key": ""}
    for got, want in zip(from_hex(result["tensors"]), donor.tensors):
        np.testing.assert_array_equal(got, want)
