"""A newcomer learns what a downloaded state must look like from its own state without copying that state."""

import threading
import time

import pytest
import torch
from averager_helpers import FAST, averagers_on, dht_swarm
from test_averaging_state_averager import _assert_same, _wait_for_declarations

from hivemind.averaging import DecentralizedAverager, state_snapshot
from hivemind.averaging.state_snapshot import describe_state, describing_state, packed_copy


def test_packed_copy_copies_nothing_while_describing_the_state_and_only_in_that_thread():
    tensors = [torch.randn(3, 4), torch.arange(5)]
    with describing_state():
        described = packed_copy(tensors)
        other_thread = []
        thread = threading.Thread(target=lambda: other_thread.extend(packed_copy(tensors)))
        thread.start()
        thread.join()
    assert [(t.shape, t.dtype, t.device.type) for t in described] == [(t.shape, t.dtype, "meta") for t in tensors]
    for got, sent in zip(other_thread, tensors):
        assert got.data_ptr() != sent.data_ptr() and torch.equal(got, sent)
    assert all(got.device.type == "cpu" and torch.equal(got, sent) for got, sent in zip(packed_copy(tensors), tensors))


def test_changing_the_described_copies_in_place_leaves_the_state_alone():
    state = torch.ones(3)

    def get_current_state():
        copies = packed_copy([state])
        copies[0].mul_(2)  # e.g. a state that is shared scaled
        return {}, copies, None

    assert describe_state(get_current_state) == [((3,), torch.float32)]
    assert torch.equal(state, torch.ones(3))


def test_a_get_current_state_that_reads_its_copies_is_asked_again_with_real_ones():
    devices = []

    def get_current_state():
        copies = packed_copy([torch.ones(2, 3)])
        devices.append(copies[0].device.type)
        return {"total": float(copies[0].sum())}, copies, None  # reads a value: impossible without data

    assert describe_state(get_current_state) == [((2, 3), torch.float32)]
    assert devices == ["meta", "cpu"]


def test_a_get_current_state_that_returns_its_tensors_lazily_is_described_too():
    """The tensors may come as any iterable, e.g. a map() that moves each copy to the CPU: it is consumed while the
    copies are still data-less (and asked again with real ones if that fails), not after."""

    def get_current_state():
        return {}, map(torch.Tensor.cpu, packed_copy([torch.ones(2, 3), torch.zeros(4, dtype=torch.int64)])), None

    assert describe_state(get_current_state) == [((2, 3), torch.float32), ((4,), torch.int64)]


@pytest.mark.timeout(120)
def test_newcomer_checks_the_donor_against_its_own_state_without_copying_it(monkeypatch):
    """The default get_current_state copies the whole state into shared memory (what a donor streams); the newcomer
    calls it only for the shapes and dtypes, which must not cost a second state's worth of memory."""
    shared_allocations = []  # (thread, bytes) of every shared buffer made in this (the users') process
    make_shared_buffer = state_snapshot._shared_buffer

    def counted(nbytes: int):
        shared_allocations.append((threading.current_thread(), nbytes))
        return make_shared_buffer(nbytes)

    donor_tensors = [torch.randn(2**20), torch.arange(6).reshape(2, 3)]
    with dht_swarm(2) as dhts:
        with averagers_on(dhts, [donor_tensors, [torch.zeros(2**20), torch.zeros(2, 3, dtype=torch.int64)]]) as (
            donor,
            newcomer,
        ):
            _wait_for_declarations(dhts[1], "test", {donor.peer_id.to_bytes(): 0.0})
            monkeypatch.setattr(state_snapshot, "_shared_buffer", counted)
            _, tensors = newcomer.load_state_from_peers(timeout=30)
            _assert_same(tensors, donor_tensors)
            copied_by_donor = [nbytes for thread, nbytes in shared_allocations if thread is donor._state_thread]
            copied_by_newcomer = [nbytes for thread, nbytes in shared_allocations if thread is not donor._state_thread]
    assert copied_by_donor and sum(copied_by_donor) >= 4 * 2**20  # what it streamed: the counting works
    assert copied_by_newcomer == []


class SlowStateAverager(DecentralizedAverager):
    def get_current_state(self):
        time.sleep(3.0)
        return super().get_current_state()


@pytest.mark.timeout(60)
def test_a_slow_get_current_state_counts_against_the_load_timeout():
    """Asking our own state for its shapes is part of loading: it may not add its time on top of ``timeout``."""
    with dht_swarm(1) as dhts:
        averager = SlowStateAverager([torch.zeros(3)], dhts[0], prefix="slow_template", start=True, **FAST)
        try:
            started = time.monotonic()
            with pytest.raises(TimeoutError, match="get_current_state"):
                averager.load_state_from_peers(timeout=1.0)
            assert time.monotonic() - started < 2.5
        finally:
            averager.shutdown()
