import asyncio
import gc
import multiprocessing as mp
import pickle
import subprocess
import sys
import threading
import time

import pytest

from hivemind.utils.mpfuture import InvalidStateError, MPFuture

START_METHODS = ["fork", "spawn"]


def _run_in_child(start_method: str, target, *args, daemon: bool = True) -> mp.Process:
    process = mp.get_context(start_method).Process(target=target, args=args, daemon=daemon)
    process.start()
    return process


def _set_result(future, value):
    future.set_result(value)


def _set_exception(future, message):
    future.set_exception(ValueError(message))


def _report_running(future, report):
    report.set_result(future.set_running_or_notify_cancel())


def _report_cancelled(future, report):
    report.set_result((future.cancelled(), future.done()))


def _run_then_finish(future, report, go):
    report.set_result(future.set_running_or_notify_cancel())
    go.wait(10)
    future.set_result("done")


def _set_twice(future, report):
    future.set_result(1)
    try:
        future.set_result(2)
        report.set_result("no error")
    except InvalidStateError:
        report.set_result("invalid state")


def _wait_in_child(future, report):
    errors = []
    for call in (lambda: future.result(timeout=0), lambda: future.add_done_callback(print)):
        try:
            call()
        except RuntimeError as e:
            errors.append("only be called in the process that created" in str(e))
    report.set_result(errors)


def _resolve_many(futures):
    for i, future in enumerate(futures):
        future.set_result(i)


def _ask_parent(report, answer):
    question = MPFuture()  # this child is the origin of `question`
    report.set_result(question)
    answer.set_result(question.result(timeout=10) * 2)


def _resolve_in_grandchild(future, report):
    report.set_result(future.running())  # opens this process's connection before forking
    grandchild = mp.get_context("fork").Process(target=_set_result, args=(future, "from grandchild"))
    grandchild.start()
    grandchild.join(10)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("start_method", START_METHODS)
def test_result_set_in_child(start_method):
    future = MPFuture()
    process = _run_in_child(start_method, _set_result, future, {"answer": 42})
    assert future.result(timeout=20) == {"answer": 42}
    assert future.done() and not future.cancelled()
    process.join(10)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("start_method", START_METHODS)
def test_exception_set_in_child(start_method):
    future = MPFuture()
    process = _run_in_child(start_method, _set_exception, future, "boom")
    with pytest.raises(ValueError, match="boom"):
        future.result(timeout=20)
    assert isinstance(future.exception(), ValueError)
    process.join(10)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("start_method", START_METHODS)
def test_cancel_in_origin_is_seen_by_child(start_method):
    future, report = MPFuture(), MPFuture()
    assert future.cancel()
    process = _run_in_child(start_method, _report_running, future, report)
    assert report.result(timeout=20) is False
    assert future.cancelled()
    process.join(10)


@pytest.mark.timeout(30)
def test_child_observes_cancelled_state():
    future, report = MPFuture(), MPFuture()
    future.cancel()
    process = _run_in_child("fork", _report_cancelled, future, report)
    assert report.result(timeout=20) == (True, True)
    process.join(10)


@pytest.mark.timeout(30)
def test_running_future_cannot_be_cancelled():
    future, report, go = MPFuture(), MPFuture(), mp.get_context("fork").Event()
    process = _run_in_child("fork", _run_then_finish, future, report, go)
    assert report.result(timeout=20) is True
    assert future.running() and not future.cancel()
    go.set()
    assert future.result(timeout=10) == "done"
    process.join(10)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("start_method", START_METHODS)
async def test_await_in_origin_loop(start_method):
    future = MPFuture()
    process = _run_in_child(start_method, _set_result, future, "awaited")
    assert await asyncio.wait_for(future, timeout=20) == "awaited"
    process.join(10)


async def test_cancelling_the_awaiting_task_cancels_the_future():
    future = MPFuture()
    task = asyncio.create_task(asyncio.wait_for(future, timeout=10))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.01)
    assert future.cancelled()


@pytest.mark.timeout(30)
def test_double_set_in_child_raises_invalid_state():
    future, report = MPFuture(), MPFuture()
    process = _run_in_child("fork", _set_twice, future, report)
    assert report.result(timeout=20) == "invalid state"
    assert future.result() == 1
    process.join(10)


def test_double_set_in_origin_raises_invalid_state():
    future = MPFuture()
    future.set_result(1)
    with pytest.raises(InvalidStateError):
        future.set_result(2)
    with pytest.raises(InvalidStateError):
        future.set_exception(ValueError())


@pytest.mark.timeout(30)
def test_waiting_is_refused_outside_origin():
    future, report = MPFuture(), MPFuture()
    process = _run_in_child("fork", _wait_in_child, future, report)
    assert report.result(timeout=20) == [True, True]
    process.join(10)


def test_done_callback_runs_when_child_sets_result():
    future, called = MPFuture(), threading.Event()
    future.add_done_callback(lambda f: called.set())
    process = _run_in_child("fork", _set_result, future, 1)
    assert called.wait(20)
    process.join(10)


def test_unpickling_in_origin_returns_the_same_object():
    future = MPFuture()
    assert pickle.loads(pickle.dumps(future)) is future


@pytest.mark.timeout(30)
def test_future_dropped_by_origin_looks_cancelled_to_child():
    future, report = MPFuture(), MPFuture()
    orphan_bytes = pickle.dumps(future)
    del future
    gc.collect()
    process = _run_in_child("fork", _report_running, pickle.loads(orphan_bytes), report)
    assert report.result(timeout=20) is False
    process.join(10)


@pytest.mark.timeout(30)
def test_grandchild_forked_after_child_connected_can_resolve():
    future, report = MPFuture(), MPFuture()
    process = _run_in_child("fork", _resolve_in_grandchild, future, report, daemon=False)
    assert report.result(timeout=20) is False
    assert future.result(timeout=20) == "from grandchild"
    process.join(10)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("start_method", START_METHODS)
def test_child_can_be_the_origin_of_its_own_futures(start_method):
    report, answer = MPFuture(), MPFuture()
    process = _run_in_child(start_method, _ask_parent, report, answer)
    question = report.result(timeout=20)
    with pytest.raises(RuntimeError):
        question.result()  # owned by the child
    question.set_result(21)
    assert answer.result(timeout=20) == 42
    process.join(10)


def test_future_sent_back_to_its_origin_is_the_same_object():
    future = MPFuture()
    holder = MPFuture()
    process = _run_in_child("fork", _set_result, holder, [future])
    assert holder.result(timeout=20)[0] is future
    process.join(10)


@pytest.mark.timeout(30)
def test_many_futures_resolved_quickly():
    futures = [MPFuture() for _ in range(1000)]
    process = _run_in_child("fork", _resolve_many, futures)
    futures[0].result(timeout=20)  # the child is up and connected
    start = time.perf_counter()
    assert [future.result(timeout=20) for future in futures] == list(range(1000))
    elapsed = time.perf_counter() - start
    process.join(10)
    assert elapsed < 2.0, f"1000 futures took {elapsed:.2f} s"


@pytest.mark.timeout(30)
def test_connection_threads_end_with_the_child():
    future = MPFuture()
    process = _run_in_child("fork", _set_result, future, 1)
    future.result(timeout=20)
    process.join(10)
    deadline = time.monotonic() + 5
    while any(t.name == "MPFuture.connection" for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not any(t.name == "MPFuture.connection" for t in threading.enumerate())


ORIGIN_SCRIPT = """
import multiprocessing as mp
from hivemind.utils.mpfuture import MPFuture

def work(future):
    future.set_result(7)

if __name__ == "__main__":
    for method in ("fork", "spawn"):
        future = MPFuture()
        process = mp.get_context(method).Process(target=work, args=(future,))
        process.start()
        assert future.result(timeout=20) == 7
        process.join()
    print("finished")
"""


@pytest.mark.timeout(60)
def test_origin_process_exits_cleanly(tmp_path):
    script = tmp_path / "origin.py"
    script.write_text(ORIGIN_SCRIPT)
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=50)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "finished" and result.stderr == ""
