"""A donor's get_current_state, which runs in the user's process, as users write it: without infos, or slow enough
that the averager shuts down before it returns (what it hands over must not stay behind in the user's process)."""

import gc
import os
import threading
import time
from typing import Set

import pytest
import torch
from averager_helpers import FAST, dht_swarm

from hivemind.averaging.averager import DecentralizedAverager
from hivemind.dht import DHT


def _wait_for_donor(dht: DHT, prefix: str, donor: DecentralizedAverager, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = dht.get(f"{prefix}.all_averagers", latest=True)
        if result is not None and donor.peer_id.to_bytes() in result.value:
            return
        time.sleep(0.1)
    raise AssertionError(f"{donor.peer_id} never declared itself a donor under {prefix}")


def _shared_memory_descriptors(pid: str = "self") -> Set[str]:
    """What a process's open descriptors to shared memory point to (torch's blocks are unlinked files)."""
    targets = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("/dev/shm/torch_"):
            targets.add(target)
    return targets


class StateWithoutInfos(DecentralizedAverager):
    """get_current_state may return (metadata, tensors), leaving the infos out."""

    def get_current_state(self):
        metadata, tensors, _ = super().get_current_state()
        return metadata, tensors


@pytest.mark.timeout(120)
def test_state_returned_without_infos_is_served():
    state = [torch.randn(1000), torch.arange(5)]
    with dht_swarm(2) as dhts:
        averagers = [
            StateWithoutInfos(tensors, dht, prefix="state_no_infos", start=True, allow_state_sharing=share, **FAST)
            for tensors, dht, share in [
                (state, dhts[0], True),
                ([torch.zeros(1000), torch.zeros(5).long()], dhts[1], False),
            ]
        ]
        try:
            _wait_for_donor(dhts[1], "state_no_infos", averagers[0])
            result = averagers[1].load_state_from_peers(timeout=30)
            assert result is not None, "the donor refused its state"
            metadata, tensors = result
            assert metadata == {"group_key": ""}
            assert all(torch.equal(got, sent) for got, sent in zip(tensors, state))
        finally:
            for averager in averagers:
                averager.shutdown()


class SlowToCopy(DecentralizedAverager):
    """A donor whose get_current_state returns plain (unshared) copies, once the test lets it."""

    slow = False
    entered, release = threading.Event(), threading.Event()

    def get_current_state(self):
        metadata, tensors, infos = super().get_current_state()
        if self.slow:
            self.entered.set()
            self.release.wait(30)
        return metadata, [tensor.clone() for tensor in tensors], infos


@pytest.mark.timeout(120)
@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_state_prepared_after_the_donor_shut_down_leaves_no_shared_memory_behind(start_method):
    SlowToCopy.entered.clear()
    SlowToCopy.release.clear()
    with dht_swarm(2) as dhts:
        donor = SlowToCopy(
            [torch.randn(2**20)], dhts[0], prefix="state_late", start=True, start_method=start_method, **FAST
        )
        newcomer = SlowToCopy(
            [torch.zeros(2**20)], dhts[1], prefix="state_late", start=True, allow_state_sharing=False, **FAST
        )
        try:
            donor.slow = True
            _wait_for_donor(dhts[1], "state_late", donor)
            before = _shared_memory_descriptors()
            download = newcomer.load_state_from_peers(wait=False, timeout=30)
            assert SlowToCopy.entered.wait(30)
            donor.shutdown()  # the averager gives up on the state it asked for
            SlowToCopy.release.set()  # ... which the user's process hands over afterwards
            donor._state_thread.join(10)
            assert not donor._state_thread.is_alive()
            gc.collect()
            assert _shared_memory_descriptors() - before == set()  # a 4 MiB block held by nobody, forever
            assert download.result(timeout=30) is None
        finally:
            donor.shutdown()
            newcomer.shutdown()


@pytest.mark.timeout(120)
def test_many_downloads_leave_no_shared_memory_with_the_donor():
    state = [torch.randn(2**18), torch.arange(7)]
    with dht_swarm(2) as dhts:
        donor = DecentralizedAverager(state, dhts[0], prefix="state_many", start=True, **FAST)
        newcomer = DecentralizedAverager(
            [torch.zeros(2**18), torch.zeros(7, dtype=torch.int64)],
            dhts[1],
            prefix="state_many",
            start=True,
            allow_state_sharing=False,
            **FAST,
        )
        try:
            _wait_for_donor(dhts[1], "state_many", donor)
            assert newcomer.load_state_from_peers(timeout=30) is not None  # (anything opened once is open now)
            # (the newcomer's last answer, a downloaded state, may still be held here until its next answer;
            # blocks of earlier tests in this process that only wait for the garbage collector are let go first)
            gc.collect()
            before = len(_shared_memory_descriptors()), _shared_memory_descriptors(str(donor.pid))
            for _ in range(8):  # each one a new snapshot, handed from the user's process to the averager's
                _, tensors = newcomer.load_state_from_peers(timeout=30)
                assert all(torch.equal(got, sent) for got, sent in zip(tensors, state))
            del tensors
            gc.collect()
            assert (len(_shared_memory_descriptors()), _shared_memory_descriptors(str(donor.pid))) == before
        finally:
            donor.shutdown()
            newcomer.shutdown()
