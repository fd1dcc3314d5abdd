import asyncio
import threading
import time

import pytest

import hivemind.utils.asyncio as hm_asyncio
from hivemind.utils.asyncio import await_with_timeout


async def _collect(aiter):
    return [item async for item in aiter]


async def _slow_aiter(values, delay):
    for value in values:
        await asyncio.sleep(delay)
        yield value


async def test_as_aiter_and_iter_as_aiter_yield_values():
    assert await _collect(hm_asyncio.as_aiter(1, 2, 3)) == [1, 2, 3]
    assert await _collect(hm_asyncio.iter_as_aiter(range(3))) == [0, 1, 2]
    assert await _collect(hm_asyncio.as_aiter()) == []


async def test_anext_returns_items_then_default():
    iterator = hm_asyncio.as_aiter("a")
    assert await hm_asyncio.anext(iterator) == "a"
    assert await hm_asyncio.anext(iterator, "default") == "default"
    with pytest.raises(StopAsyncIteration):
        await hm_asyncio.anext(iterator)


async def test_azip_stops_at_shortest():
    assert await _collect(hm_asyncio.azip(hm_asyncio.as_aiter(1, 2, 3), hm_asyncio.as_aiter("a", "b"))) == [
        (1, "a"),
        (2, "b"),
    ]


async def test_achain_and_aenumerate():
    assert await _collect(
        hm_asyncio.achain(hm_asyncio.as_aiter(1), hm_asyncio.as_aiter(), hm_asyncio.as_aiter(2, 3))
    ) == [1, 2, 3]
    assert await _collect(hm_asyncio.aenumerate(hm_asyncio.as_aiter("x", "y"), start=5)) == [(5, "x"), (6, "y")]


async def test_asingle_requires_exactly_one_item():
    assert await hm_asyncio.asingle(hm_asyncio.as_aiter(42)) == 42
    with pytest.raises(ValueError, match="no items"):
        await hm_asyncio.asingle(hm_asyncio.as_aiter())
    with pytest.raises(ValueError, match="more than one"):
        await hm_asyncio.asingle(hm_asyncio.as_aiter(1, 2))


async def test_afirst_returns_first_or_default():
    assert await hm_asyncio.afirst(hm_asyncio.as_aiter(7, 8)) == 7
    assert await hm_asyncio.afirst(hm_asyncio.as_aiter(), default="empty") == "empty"


async def test_aiter_with_timeout_raises_on_slow_item():
    assert await _collect(hm_asyncio.aiter_with_timeout(_slow_aiter([1, 2], 0.01), timeout=1.0)) == [1, 2]
    with pytest.raises(asyncio.TimeoutError):
        await _collect(hm_asyncio.aiter_with_timeout(_slow_aiter([1, 2], 0.5), timeout=0.05))


async def test_attach_event_on_finished_sets_event_at_the_end():
    event = asyncio.Event()
    iterator = hm_asyncio.attach_event_on_finished(hm_asyncio.as_aiter(1, 2), event)
    assert await hm_asyncio.anext(iterator) == 1
    assert not event.is_set()
    assert await _collect(iterator) == [2]
    assert event.is_set()


async def test_cancel_and_wait_reports_cancellation():
    task = asyncio.create_task(asyncio.sleep(10))
    await asyncio.sleep(0)
    assert await hm_asyncio.cancel_and_wait(task) is True
    done_task = asyncio.create_task(asyncio.sleep(0, result=1))
    await asyncio.sleep(0.01)
    assert await hm_asyncio.cancel_and_wait(done_task) is False


async def test_amap_in_executor_runs_in_threads_and_keeps_order():
    main_thread = threading.get_ident()

    def work(x, y):
        assert threading.get_ident() != main_thread
        time.sleep(0.01 * (3 - x))
        return x * y

    results = await _collect(
        hm_asyncio.amap_in_executor(
            work, hm_asyncio.as_aiter(0, 1, 2), hm_asyncio.as_aiter(10, 10, 10), max_prefetch=3
        )
    )
    assert results == [0, 10, 20]


async def test_amap_in_executor_prefetches_ahead_of_consumer():
    started = []

    def work(x):
        started.append(x)
        return x

    iterator = hm_asyncio.amap_in_executor(work, hm_asyncio.as_aiter(*range(10)), max_prefetch=2)
    assert await hm_asyncio.anext(iterator) == 0
    await asyncio.sleep(0.05)
    assert 1 <= len(started) <= 4  # bounded prefetch, not the whole input
    await iterator.aclose()


async def test_amap_in_executor_propagates_errors():
    def work(x):
        if x == 1:
            raise ZeroDivisionError("bad item")
        return x

    iterator = hm_asyncio.amap_in_executor(work, hm_asyncio.as_aiter(0, 1, 2))
    assert await hm_asyncio.anext(iterator) == 0
    with pytest.raises(ZeroDivisionError, match="bad item"):
        await hm_asyncio.anext(iterator)


async def test_enter_asynchronously_acquires_and_releases_lock():
    lock = threading.Lock()
    async with hm_asyncio.enter_asynchronously(lock):
        assert lock.locked()
    assert not lock.locked()


async def test_enter_asynchronously_does_not_block_the_loop():
    lock = threading.Lock()
    lock.acquire()
    threading.Timer(0.1, lock.release).start()
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.01)

    ticker_task = asyncio.create_task(ticker())
    async with hm_asyncio.enter_asynchronously(lock):
        pass
    await hm_asyncio.cancel_and_wait(ticker_task)
    assert ticks >= 3
    assert not lock.locked()


def test_switch_to_uvloop_returns_a_working_loop():
    loop = hm_asyncio.switch_to_uvloop()
    try:
        assert loop.run_until_complete(asyncio.sleep(0, result="ok")) == "ok"
        assert "uvloop" in type(loop).__module__
    finally:
        loop.close()
        asyncio.set_event_loop_policy(None)


async def test_enter_asynchronously_cancelled_while_waiting_leaves_lock_free():
    lock = threading.Lock()
    lock.acquire()

    async def enter():
        async with hm_asyncio.enter_asynchronously(lock):
            raise AssertionError("must not enter after cancellation")

    task = asyncio.create_task(enter())
    await asyncio.sleep(0.05)
    assert await hm_asyncio.cancel_and_wait(task)
    lock.release()  # the worker thread now acquires it and must give it back
    await asyncio.sleep(0.1)
    assert lock.acquire(timeout=2)
    lock.release()


async def test_await_with_timeout_never_loses_a_cancellation_that_arrives_with_the_result():
    loop = asyncio.get_running_loop()
    for timeout in (None, 10.0):
        future = loop.create_future()
        task = asyncio.create_task(await_with_timeout(future, timeout))
        await asyncio.sleep(0)
        future.set_result("done")
        task.cancel()  # same step as the result: asyncio.wait_for (before 3.12) would return "done"
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_await_with_timeout_raises_timeout_error_and_passes_results_through():
    with pytest.raises(asyncio.TimeoutError):
        await await_with_timeout(asyncio.sleep(10), 0.05)
    assert await await_with_timeout(asyncio.sleep(0, result=7), 1) == 7
    assert await await_with_timeout(asyncio.sleep(0, result=8), None) == 8
