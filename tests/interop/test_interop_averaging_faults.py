"""Mixed averaging groups of the original hivemind 1.1.12 and ours beyond the plain weighted round.

Members of one group use different codecs (each sender picks its own; receivers decode what the message says),
client-mode, auxiliary and averaging_alpha members of either side take part, and a member of either side dies once
the group has formed (the steps wait for a trigger, so the test kills it at a known point and then lets the others
exchange tensors). Each side runs in its own driver process (averaging_faults_driver.py).
"""

import signal
import time
import uuid
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import pytest

from .conftest import ORIGINAL, OURS, SIDE_IMPLEMENTATION, driver_per_side
from .harness import PeerProcess, process_tree

pytestmark = [pytest.mark.interop, pytest.mark.timeout(120)]

DRIVER = Path(__file__).resolve().with_name("averaging_faults_driver.py")
SHAPES = [[300_000], [3, 4]]  # the first one is cut into several parts
TIMEOUTS = dict(min_matchmaking_time=2.0, request_timeout=1.0, sender_timeout=1.5, reducer_timeout=3.0)
STEP_TIMEOUT = 30


def start_driver(side: str, log_dir, name: str) -> PeerProcess:
    return PeerProcess(SIDE_IMPLEMENTATION[side], log_dir, name=name, driver=DRIVER)


@pytest.fixture(scope="module")
def drivers(original_env, interop_log_dir) -> Dict[str, PeerProcess]:
    with driver_per_side(interop_log_dir, "averaging-faults", DRIVER) as started:
        yield started


@pytest.fixture(scope="module")
def dhts(drivers) -> Dict[str, Dict[str, dict]]:
    """Per side: two DHT nodes ("node0", "node1") and a client-mode one ("client"); all join the original's node0."""
    first = drivers[ORIGINAL].call("dht_create", timeout=60)
    nodes = {ORIGINAL: {"node0": first}, OURS: {}}
    for side in (ORIGINAL, OURS):
        for name, client_mode in (("node0", False), ("node1", False), ("client", True)):
            if name not in nodes[side]:
                nodes[side][name] = drivers[side].call(
                    "dht_create", initial_peers=first["maddrs"], client_mode=client_mode, timeout=60
                )
    return nodes


def to_hex(tensors: List[np.ndarray]) -> List[str]:
    return [tensor.tobytes().hex() for tensor in tensors]


def from_hex(data: List[str]) -> List[np.ndarray]:
    return [np.frombuffer(bytes.fromhex(item), dtype=np.float32).reshape(shape) for item, shape in zip(data, SHAPES)]


def random_tensors(rng: np.random.Generator) -> List[np.ndarray]:
    return [rng.standard_normal(shape).astype(np.float32) for shape in SHAPES]


class Member:
    """One averager in a driver; `tensors` are its initial values, `weight` / `alpha` what it averages with."""

    def __init__(self, driver: PeerProcess, dht: dict, prefix: str, tensors, weight=1.0, alpha=1.0, **options):
        self.driver, self.tensors, self.weight, self.alpha = driver, tensors, weight, alpha
        self.auxiliary = options.get("auxiliary", False)
        self.peer_id = dht["peer_id"]
        self.handle = driver.call(
            "averager_create_with",
            dht_handle=dht["handle"],
            tensors=to_hex(tensors),
            shapes=SHAPES,
            prefix=prefix,
            averaging_alpha=alpha,
            timeout=60,
            **TIMEOUTS,
            **options,
        )
        self.control: Optional[int] = None

    def step(self, gather, **args) -> int:
        weight = None if self.auxiliary else self.weight
        return self.driver.submit(
            "averager_step", handle=self.handle, gather=gather, weight=weight, timeout=STEP_TIMEOUT, **args
        )

    def begin(self, gather, scheduled_delay: float) -> None:
        self.control = self.driver.call(
            "averager_begin",
            handle=self.handle,
            gather=gather,
            weight=self.weight,
            timeout=STEP_TIMEOUT,
            scheduled_delay=scheduled_delay,
        )

    def wait_stage(self, stage: str) -> str:
        return self.driver.call("averager_wait_stage", control=self.control, stage=stage, wait_s=40, timeout=50)

    def current(self) -> List[np.ndarray]:
        return from_hex(self.driver.call("averager_tensors", handle=self.handle))


def weighted_mean(members: List[Member]) -> List[np.ndarray]:
    contributing = [m for m in members if not m.auxiliary]
    total = sum(m.weight for m in contributing)
    return [
        sum(np.float64(m.weight) * m.tensors[i].astype(np.float64) for m in contributing) / total
        for i in range(len(SHAPES))
    ]


def run_round(members: List[Member]) -> List[dict]:
    requests = [member.step(gather=number, scheduled_delay=3.0) for number, member in enumerate(members)]
    return [
        member.driver.wait(request, timeout=STEP_TIMEOUT + 30, cmd="averager_step")
        for member, request in zip(members, requests)
    ]


# Codecs by class name, one per member (a list: one per tensor). A member cuts its tensors into parts by its own
# codec's compression ratio, and a reducer expects the parts of its own cut, so the members of one group use codecs
# of one ratio for the large tensor (the small one is a single part whatever the codec).
CODEC_SETS = {
    "16bit": ["Float16Compression", "ScaledFloat16Compression", "ScaledFloat16Compression", "Float16Compression"],
    "8bit-and-per-tensor": [
        "Uniform8BitQuantization",
        "Quantile8BitQuantization",
        ["Quantile8BitQuantization", "Float16Compression"],
        ["Uniform8BitQuantization", "Quantile8BitQuantization"],  # two of ours send the small tensor in QUANTILE
    ],
}


@pytest.mark.parametrize("codec_set", list(CODEC_SETS))
def test_mixed_group_of_four_with_a_different_codec_per_member(drivers, dhts, codec_set):
    prefix, rng = f"r8codecs_{uuid.uuid4().hex[:8]}", np.random.default_rng(11)
    places = [(ORIGINAL, "node0"), (OURS, "node0"), (ORIGINAL, "node1"), (OURS, "node1")]
    codecs = CODEC_SETS[codec_set]
    members = [
        Member(drivers[side], dhts[side][dht], prefix, random_tensors(rng), weight=weight, compression=codec,
               target_group_size=4)
        for (side, dht), weight, codec in zip(places, [1.0, 2.0, 3.0, 4.0], codecs)
    ]  # fmt: skip
    results = run_round(members)
    assert all(result == {m.peer_id: number for number, m in enumerate(members)} for result in results)

    expected, errors = weighted_mean(members), []
    for member, (side, _), codec in zip(members, places, codecs):
        for index, (got, want) in enumerate(zip(member.current(), expected)):
            error = np.abs(got.astype(np.float64) - want)
            errors.append((side, str(codec), index, float(np.quantile(error, 0.99)), float(error.mean())))
    # Every part crosses the wire twice: a sender's part and the reducer's averaged reply; a wrong weight or a part
    # decoded with the wrong codec is off by tenths on average. 8-bit codecs are coarse in the tails (99th
    # percentile), but exact on the 12-element tensor (each value gets its own bin), as 16-bit codecs nearly are.
    large_tolerance = 1e-3 if codec_set == "16bit" else 2e-2
    for side, codec, index, q99, mean in errors:
        tolerance = large_tolerance if index == 0 else 1e-3
        assert q99 < 10 * tolerance and mean < tolerance, f"{side} {codec} tensor {index}:\n" + "\n".join(
            map(str, errors)
        )


@pytest.mark.parametrize("client_side, aux_side", [(ORIGINAL, OURS), (OURS, ORIGINAL)])
def test_mixed_group_with_client_auxiliary_and_alpha_members(drivers, dhts, client_side, aux_side):
    prefix, rng = f"r8roles_{uuid.uuid4().hex[:8]}", np.random.default_rng(12)
    members = [
        Member(drivers[ORIGINAL], dhts[ORIGINAL]["node0"], prefix, random_tensors(rng), weight=1.0, alpha=0.5,
               target_group_size=4),
        Member(drivers[OURS], dhts[OURS]["node0"], prefix, random_tensors(rng), weight=2.0, target_group_size=4),
        Member(drivers[client_side], dhts[client_side]["client"], prefix, random_tensors(rng), weight=3.0,
               alpha=0.25, target_group_size=4),
        Member(drivers[aux_side], dhts[aux_side]["node1"], prefix, random_tensors(rng), auxiliary=True,
               target_group_size=4),
    ]  # fmt: skip
    results = run_round(members)
    assert all(result == {m.peer_id: number for number, m in enumerate(members)} for result in results)

    mean = weighted_mean(members)
    for number, member in enumerate(members):
        for got, start, want in zip(member.current(), member.tensors, mean):
            if member.auxiliary:
                # ours contributes nothing and receives nothing; the original's auxiliary peer writes the averages
                # of the parts it reduced into its own tensors (its quirk), so only ours is checked
                if SIDE_IMPLEMENTATION[aux_side] == "ours":
                    np.testing.assert_array_equal(got, start, err_msg=f"auxiliary member {number}")
            else:
                expected = start + member.alpha * (want - start)
                np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5, err_msg=f"member {number}")


def kill(driver: PeerProcess) -> None:
    """SIGKILL of a whole driver (its averager and DHT processes, its p2pd daemons): it dies without a goodbye."""
    for member in process_tree(driver.proc):
        try:
            member.send_signal(signal.SIGKILL)
        except Exception:  # noqa: BLE001 - already gone
            pass
    driver.close(graceful=False)


def begin_and_form_group(members: List[Member]) -> None:
    for number, member in enumerate(members):
        member.begin(gather=number, scheduled_delay=3.0)
    for member in members:
        assert member.wait_stage("AWAITING_TRIGGER") == "AWAITING_TRIGGER", "the group did not form"


@pytest.mark.parametrize("victim_dht", ["client", "node0"], ids=["client-mode-victim", "node-victim"])
def test_ours_finish_when_an_original_member_dies_after_the_group_formed(
    drivers, dhts, original_env, interop_log_dir, victim_dht
):
    prefix, rng = f"r8orig_dies_{uuid.uuid4().hex[:8]}", np.random.default_rng(13)
    victim_driver = start_driver(ORIGINAL, interop_log_dir, "original-victim")
    try:
        victim_dht_info = victim_driver.call(
            "dht_create", initial_peers=dhts[ORIGINAL]["node0"]["maddrs"], client_mode=victim_dht == "client",
            timeout=60,
        )  # fmt: skip
        survivors = [
            Member(drivers[OURS], dhts[OURS][name], prefix, random_tensors(rng), weight=weight, target_group_size=3)
            for name, weight in (("node0", 1.0), ("node1", 3.0))
        ]
        victim = Member(victim_driver, victim_dht_info, prefix, random_tensors(rng), target_group_size=3)
        begin_and_form_group([*survivors, victim])
        kill(victim_driver)
        started = time.monotonic()
        for member in survivors:
            member.driver.call("averager_trigger", control=member.control)
        for member in survivors:
            gathered = member.driver.call("averager_finish", control=member.control, timeout=STEP_TIMEOUT)
            assert set(gathered) == {m.peer_id for m in (*survivors, victim)}
        elapsed = time.monotonic() - started
    finally:
        victim_driver.close(graceful=False)
    assert elapsed < TIMEOUTS["reducer_timeout"] + 5, f"the survivors took {elapsed:.1f} s to give up on the dead"

    mean = weighted_mean(survivors)
    for member in survivors:
        averaged_elements = 0
        for got, start, want in zip(member.current(), member.tensors, mean):
            averaged = np.isclose(got, want, rtol=0, atol=1e-5)
            averaged_elements += averaged.sum()
            if victim_dht == "client":  # a client reduces nothing: every part is the survivors' mean
                assert averaged.all(), f"{(~averaged).sum()} of {got.size} elements are not the survivors' mean"
            else:  # the parts the dead node was to reduce keep local values; the others are the survivors' mean
                assert (averaged | (got == start)).all(), "elements neither averaged nor kept"
        assert averaged_elements > 0, "the survivors averaged nothing"


def test_our_member_survives_when_another_of_ours_dies_in_a_mixed_group(drivers, dhts, interop_log_dir):
    prefix, rng = f"r8ours_dies_{uuid.uuid4().hex[:8]}", np.random.default_rng(14)
    victim_driver = start_driver(OURS, interop_log_dir, "ours-victim")
    try:
        victim_dht = victim_driver.call("dht_create", initial_peers=dhts[ORIGINAL]["node0"]["maddrs"], timeout=60)
        others = [
            Member(drivers[side], dhts[side][name], prefix, random_tensors(rng), target_group_size=4)
            for side, name in ((ORIGINAL, "node0"), (ORIGINAL, "node1"), (OURS, "node0"))
        ]
        victim = Member(victim_driver, victim_dht, prefix, random_tensors(rng), target_group_size=4)
        begin_and_form_group([*others, victim])
        kill(victim_driver)
        for member in others:
            member.driver.call("averager_trigger", control=member.control)
        ours = others[-1]
        started = time.monotonic()
        try:  # how the round ends for the original's members is theirs; ours must end within its own timeouts
            ours.driver.call("averager_finish", control=ours.control, timeout=STEP_TIMEOUT)
        except Exception as e:  # noqa: BLE001 - a failed round is acceptable, a hang or a dead process is not
            assert "RemoteError" in type(e).__name__, e
        assert time.monotonic() - started < TIMEOUTS["reducer_timeout"] + 5
        for member in others[:-1]:  # let the original's steps end before the next round
            try:
                member.driver.call("averager_finish", control=member.control, timeout=STEP_TIMEOUT)
            except Exception:  # noqa: BLE001
                pass
    finally:
        victim_driver.close(graceful=False)
    # and our member still averages with the survivors afterwards
    for member in others:
        member.tensors = member.current()
    results = run_round(others)
    assert all(set(result) == {m.peer_id for m in others} for result in results)
    for member, want in zip(others, [weighted_mean(others)] * 3):
        for got, expected in zip(member.current(), want):
            np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
