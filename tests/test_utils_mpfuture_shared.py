"""MPFuture subclasses across processes, and state read from shared memory instead of a round trip."""

import gc
import multiprocessing as mp
import pickle

import pytest

from hivemind.utils.mpfuture import InvalidStateError, MPFuture, _Peer

START_METHODS = ["fork", "spawn"]


class TaggedFuture(MPFuture):
    """A subclass with one shared number and one plain attribute sent along."""

    def __init__(self, tag: str):
        super().__init__()
        self.tag = tag

    def _extra_pickle_state(self):
        return self.tag

    def _restore_extra_state(self, state):
        self.tag = state

    @property
    def counter(self) -> int:
        return self._shared.get_int(0)

    @counter.setter
    def counter(self, value: int) -> None:
        self._shared.set_int(0, value)


def _describe(future, report):
    report.set_result((type(future).__name__, future.tag, future.counter))
    future.counter = 42


def _states_without_round_trips(future, report):
    def refuse(*args, **kwargs):
        raise AssertionError("a round trip to the origin was made")

    _Peer.request = refuse
    report.set_result((future.done(), future.cancelled(), future.running()))


def _set_then_check(future, report):
    future.set_result("value")
    outcome = [future.done()]
    try:
        future.set_exception(ValueError("second"))
        outcome.append("no error")
    except InvalidStateError:
        outcome.append("invalid state")
    report.set_result(outcome)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("start_method", START_METHODS)
def test_subclass_arrives_as_itself_with_shared_state(start_method):
    future, report = TaggedFuture("hello"), MPFuture()
    future.counter = 7
    process = mp.get_context(start_method).Process(target=_describe, args=(future, report))
    process.start()
    assert report.result(timeout=20) == ("TaggedFuture", "hello", 7)
    process.join(10)
    assert future.counter == 42  # written by the child, seen here through shared memory


def test_subclass_pickled_in_place_is_the_same_object():
    future = TaggedFuture("x")
    assert pickle.loads(pickle.dumps(future)) is future


@pytest.mark.timeout(30)
@pytest.mark.parametrize("start_method", START_METHODS)
def test_child_reads_state_from_shared_memory(start_method):
    future, report = MPFuture(), MPFuture()
    future.cancel()
    process = mp.get_context(start_method).Process(target=_states_without_round_trips, args=(future, report))
    process.start()
    assert report.result(timeout=20) == (True, True, False)
    process.join(10)


@pytest.mark.timeout(30)
def test_one_way_completion_is_done_locally_and_refuses_a_second():
    future, report = MPFuture(), MPFuture()
    process = mp.get_context("fork").Process(target=_set_then_check, args=(future, report))
    process.start()
    assert report.result(timeout=20) == [True, "invalid state"]
    assert future.result(timeout=20) == "value"
    process.join(10)


def test_state_is_mirrored_after_each_transition():
    future = MPFuture()
    proxy = MPFuture._make_proxy(
        -1, future._address, future._authkey, future._uid, future._segment_path, future._slot_index
    )
    assert not proxy.done() and not proxy.running()
    future.set_running_or_notify_cancel()
    assert proxy.running()
    future.set_result(1)
    assert proxy.done() and not proxy.cancelled()


def test_dropped_future_looks_cancelled_through_its_slot():
    future = MPFuture()
    location = (-1, future._address, future._authkey, future._uid, future._segment_path, future._slot_index)
    proxy = MPFuture._make_proxy(*location)
    del future
    gc.collect()
    assert proxy.cancelled()
    MPFuture()  # the freed slot is reused by a new future: the old proxy must not see the new one's state
    assert proxy.cancelled()
