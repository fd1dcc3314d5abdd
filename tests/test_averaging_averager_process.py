"""DecentralizedAverager as a process: spawn, triggers and schedules, a peer killed mid-round, memory over rounds."""

import os
import signal
import threading
import time

import psutil
import pytest
import torch
from averager_helpers import FAST, averagers_on, dht_swarm, run_allreduce, wait_for_stage

from hivemind.averaging.averager import DecentralizedAverager
from hivemind.averaging.control import AveragingStage
from hivemind.utils.timed_storage import get_dht_time


def _local(averager):
    with averager.get_tensors() as tensors:
        return [tensor.clone() for tensor in tensors]


@pytest.mark.timeout(90)
def test_spawned_averagers_average():
    tensors = [[torch.full((50,), 1.0)], [torch.full((50,), 3.0)]]
    with dht_swarm(2) as dhts, averagers_on(dhts, tensors, target_group_size=2, start_method="spawn") as averagers:
        controls = [averager.step(wait=False) for averager in averagers]
        for control in controls:
            control.result(timeout=60)
        for averager in averagers:
            assert torch.allclose(_local(averager)[0], torch.full((50,), 2.0))


@pytest.mark.timeout(60)
def test_require_trigger_holds_the_allreduce_until_allowed():
    tensors = [[torch.full((10,), 0.0)], [torch.full((10,), 2.0)]]
    with dht_swarm(2) as dhts, averagers_on(dhts, tensors, target_group_size=2) as averagers:
        controls = [averager.step(wait=False, require_trigger=True) for averager in averagers]
        wait_for_stage(controls, AveragingStage.AWAITING_TRIGGER)
        assert not any(control.done() for control in controls)
        assert torch.equal(_local(averagers[0])[0], torch.zeros(10))
        run_allreduce(controls, timeout=30)
        for control in controls:
            assert control.stage == AveragingStage.FINISHED and control.began_allreduce
        assert torch.allclose(_local(averagers[0])[0], torch.ones(10))


@pytest.mark.timeout(60)
def test_weight_set_while_awaiting_trigger_is_used():
    tensors = [[torch.full((10,), 0.0)], [torch.full((10,), 4.0)]]
    with dht_swarm(2) as dhts, averagers_on(dhts, tensors, target_group_size=2) as averagers:
        controls = [averager.step(wait=False, require_trigger=True) for averager in averagers]
        wait_for_stage(controls, AveragingStage.AWAITING_TRIGGER)
        controls[1].weight = 3.0  # in the user's process; the averager's process reads it from shared memory
        run_allreduce(controls, timeout=30)
        assert torch.allclose(_local(averagers[0])[0], torch.full((10,), 3.0))  # (0 * 1 + 4 * 3) / 4


@pytest.mark.timeout(60)
def test_scheduled_step_starts_at_its_scheduled_time():
    tensors = [[torch.zeros(4)], [torch.ones(4)]]
    with dht_swarm(2) as dhts, averagers_on(dhts, tensors) as averagers:  # no target size: wait for the schedule
        scheduled_time = get_dht_time() + 3.0
        controls = [averager.step(wait=False, scheduled_time=scheduled_time) for averager in averagers]
        for control in controls:
            control.result(timeout=30)
        assert get_dht_time() >= scheduled_time - 0.1


@pytest.mark.timeout(60)
def test_cancelled_step_stops_matchmaking():
    with dht_swarm(1) as dhts, averagers_on(dhts, [[torch.zeros(3)]]) as (averager,):
        control = averager.step(wait=False)
        wait_for_stage([control], AveragingStage.LOOKING_FOR_GROUP)
        assert control.cancel()
        assert control.cancelled()
        # the averager is free for the next step right away
        with pytest.raises(Exception, match="could not find a group"):
            averager.step(timeout=1.5, scheduled_time=get_dht_time() + 0.5)


def _one_of_three_stops(sig: int, size: int, max_seconds: float, min_averaged: int, **options) -> None:
    """Three averagers join a group; the third gets ``sig`` before the all-reduce (SIGKILL: gone; SIGSTOP: alive,
    connected, silent). The other two return within ``max_seconds`` with the mean of the two, or their own values on
    the stopped peer's parts (at least ``min_averaged`` elements averaged)."""
    values = (0.0, 3.0, 300.0)
    tensors = [[torch.full((size,), value)] for value in values]
    with dht_swarm(3) as dhts, averagers_on(dhts, tensors, target_group_size=3, **options) as averagers:
        controls = [averager.step(wait=False, require_trigger=True) for averager in averagers]
        wait_for_stage(controls, AveragingStage.AWAITING_TRIGGER)
        os.kill(averagers[2].pid, sig)
        try:
            elapsed = run_allreduce(controls[:2], timeout=60)
            assert elapsed < max_seconds, f"survivors took {elapsed:.1f} s"
            survivors_mean = (values[0] + values[1]) / 2
            for averager, own in zip(averagers[:2], values):
                result = _local(averager)[0]
                averaged = torch.isclose(result, torch.tensor(survivors_mean))
                kept = torch.isclose(result, torch.tensor(own))  # the stopped peer's parts keep local values
                assert bool((averaged | kept).all()) and averaged.sum() >= min_averaged
        finally:
            if sig != signal.SIGKILL:
                os.kill(averagers[2].pid, signal.SIGKILL)


@pytest.mark.timeout(120)
def test_survivors_finish_when_a_peer_is_killed_mid_round():
    # generous timeouts: a loaded machine may delay a healthy peer's parts; several small parts per member, so that
    # the survivors reduce about two thirds
    _one_of_three_stops(
        signal.SIGKILL, 3000, max_seconds=6.0 + 3.0, min_averaged=3000 // 2, part_size_bytes=1024,
        sender_timeout=3.0, reducer_timeout=6.0,
    )  # fmt: skip


@pytest.mark.timeout(90)
def test_survivors_finish_when_a_peer_freezes_mid_round():
    # generous timeouts: a loaded machine may delay healthy peers; several small parts per member; returns in about
    # one reducer timeout
    _one_of_three_stops(
        signal.SIGSTOP, 3000, max_seconds=6.0 + 3.0, min_averaged=1000, part_size_bytes=1024,
        sender_timeout=3.0, reducer_timeout=6.0,
    )  # fmt: skip


@pytest.mark.timeout(60)
def test_survivors_of_a_frozen_peer_return_within_one_derived_reducer_timeout():
    """No timeouts given: the derived ones (loopback floors) are 5 s per sender and 10 s per reducer."""
    derived_reducer_timeout = 10.0
    _one_of_three_stops(
        signal.SIGSTOP, 300, max_seconds=derived_reducer_timeout + 5.0, min_averaged=300 // 2, part_size_bytes=256
    )


@pytest.mark.timeout(120)
def test_default_deadlines_tolerate_a_throttled_peer():
    """A peer that runs only half of the time (paused 0.3 s, then running 0.3 s) is slow, not failed."""
    size = 2**20  # 4 MiB per peer
    tensors = [[torch.full((size,), float(value))] for value in (0.0, 3.0, 6.0)]
    with dht_swarm(3) as dhts, averagers_on(dhts, tensors, target_group_size=3) as averagers:
        stop = threading.Event()

        def throttle(pid):
            while not stop.is_set():
                os.kill(pid, signal.SIGSTOP)
                time.sleep(0.3)
                os.kill(pid, signal.SIGCONT)
                time.sleep(0.3)

        controls = [averager.step(wait=False, require_trigger=True) for averager in averagers]
        wait_for_stage(controls, AveragingStage.AWAITING_TRIGGER)
        throttler = threading.Thread(target=throttle, args=(averagers[2].pid,), daemon=True)
        throttler.start()
        try:
            run_allreduce(controls, timeout=90)
        finally:
            stop.set()
            throttler.join()
        for averager in averagers:  # every part was averaged: nobody was excluded
            assert torch.allclose(_local(averager)[0], torch.full((size,), 3.0))


def _rss(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


def _p2pd_rss(dht) -> int:
    """RSS of the p2pd daemon that ``dht`` started (the averager on top of it uses the same one)."""
    daemons = [child for child in psutil.Process(dht.pid).children(recursive=True) if child.name() == "p2pd"]
    assert len(daemons) == 1, daemons
    return _rss(daemons[0].pid)


@pytest.mark.timeout(240)
def test_repeated_rounds_with_failures_do_not_grow_memory():
    """Every third round, peer 2 joins the group and then aborts its step: the others exclude it mid-round."""
    tensors = [[torch.randn(2**18)] for _ in range(3)]  # 1 MiB each
    options = dict(target_group_size=3, sender_timeout=1.0, reducer_timeout=2.0)  # failed rounds end fast
    with dht_swarm(3) as dhts, averagers_on(dhts, tensors, **options) as averagers:
        survivors_of_aborts = []

        def run_rounds(count):
            for round_index in range(count):
                aborting = round_index % 3 == 0
                controls = [
                    averager.step(wait=False, require_trigger=aborting and index == 2)
                    for index, averager in enumerate(averagers)
                ]
                if aborting:
                    wait_for_stage([controls[2]], AveragingStage.AWAITING_TRIGGER)  # it is in the group
                    assert controls[2].cancel()
                for control in controls[:2] if aborting else controls:
                    gathered = control.result(timeout=30)
                    if aborting:
                        survivors_of_aborts.append(len(gathered))

        def memory():
            return [_rss(averager.pid) for averager in averagers], [_p2pd_rss(dht) for dht in dhts]

        run_rounds(6)  # warm up: allocator pools, buffers, streams of both kinds of rounds
        averagers_before, daemons_before = memory()
        run_rounds(30)
        averagers_after, daemons_after = memory()
        assert survivors_of_aborts == [3] * 24  # the aborted peer had joined: these rounds failed mid-round for it
        averager_growth = [(after - before) / 2**20 for after, before in zip(averagers_after, averagers_before)]
        daemon_growth = [(after - before) / 2**20 for after, before in zip(daemons_after, daemons_before)]
        assert max(averager_growth) < 16, f"averager RSS grew by {averager_growth} MiB over 30 rounds"
        assert max(daemon_growth) < 16, f"p2pd RSS grew by {daemon_growth} MiB over 30 rounds"


@pytest.mark.timeout(90)
@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_load_state_from_a_peer_uses_its_get_current_state(start_method):
    tensors = [[torch.arange(6, dtype=torch.float32)], [torch.zeros(6)]]
    options = dict(allow_state_sharing=[True, False], start_method=start_method)
    with dht_swarm(2) as dhts, averagers_on(dhts, tensors, **options) as (donor, newcomer):
        donor.state_sharing_priority = 5.0
        assert donor.allow_state_sharing and donor.state_sharing_priority == 5.0
        deadline = time.monotonic() + 30
        while True:  # the donor's declaration reaches the DHT in the background
            state = newcomer.load_state_from_peers(timeout=10)
            if state is not None or time.monotonic() > deadline:
                break
        assert state is not None
        metadata, downloaded = state
        assert metadata == {"group_key": ""}
        assert torch.equal(downloaded[0], torch.arange(6, dtype=torch.float32))
        assert newcomer.load_state_from_peers(wait=False).result(timeout=30) is not None


@pytest.mark.timeout(60)
def test_nobody_shares_a_state():
    tensors = [[torch.zeros(2)], [torch.zeros(2)]]
    with dht_swarm(2) as dhts, averagers_on(dhts, tensors, allow_state_sharing=False) as (first, _second):
        assert first.load_state_from_peers(timeout=5) is None


@pytest.mark.timeout(60)
def test_shutdown_fails_pending_steps():
    with dht_swarm(1) as dhts, averagers_on(dhts, [[torch.zeros(3)]]) as (averager,):
        control = averager.step(wait=False)
        averager.shutdown()
        with pytest.raises(Exception, match="shut down"):
            control.result(timeout=10)


@pytest.mark.timeout(60)
def test_background_start_and_context_manager():
    with dht_swarm(1) as (dht,):
        averager = DecentralizedAverager([torch.zeros(2)], dht, prefix="bg", start=False, **FAST)
        with averager:
            averager.run_in_background(await_ready=False)
            averager.wait_until_ready(timeout=30)
            assert averager.is_alive() and averager.get_group_bits() == ""
        assert not averager.is_alive()
