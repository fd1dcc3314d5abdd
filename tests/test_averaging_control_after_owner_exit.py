"""A StepControl that reaches a process after the process that made it has exited (e.g. a step request still in the
pipe when the user's process dies) behaves like any MPFuture of an exited process: it is done and cancelled, and
cannot be cancelled or completed; its repr works, and its shared fields say clearly why they are unavailable
(they raised AttributeError: 'NoneType' object has no attribute 'get_int', repr() and cancel() included)."""

import multiprocessing as mp
import pickle

import pytest

from hivemind.averaging.control import StepControl
from hivemind.utils.mpfuture import InvalidStateError


def _pickle_a_step_and_exit(queue) -> None:
    control = StepControl(scheduled_time=1e9, deadline=None, allow_retries=True, weight=2.0, data_for_gather=b"x")
    queue.put(pickle.dumps(control))


@pytest.mark.timeout(90)
@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_step_control_of_an_exited_process_is_usable_as_a_dead_future(start_method):
    context = mp.get_context(start_method)
    queue = context.Queue()
    owner = context.Process(target=_pickle_a_step_and_exit, args=(queue,))
    owner.start()
    data = queue.get(timeout=60)  # (a spawned child imports torch: seconds on a busy machine)
    owner.join(20)
    assert owner.exitcode == 0

    control = pickle.loads(data)
    assert isinstance(control, StepControl)
    assert "state unavailable" in repr(control)
    assert control.done() and control.cancelled()
    assert control.cancel() is False
    with pytest.raises(InvalidStateError):
        control.set_result({})
    for read in (lambda: control.weight, lambda: control.stage, lambda: control.triggered, control.allow_allreduce):
        with pytest.raises(RuntimeError, match=rf"process that made it \(pid {owner.pid}\) has exited"):
            read()
    assert control.data_for_gather == b"x" and control.deadline is None  # (sent along, not shared)
