"""Small helpers for async iterators, executors and event loops used across hivemind."""

from __future__ import annotations

import asyncio
import concurrent.futures
import sys
from contextlib import AbstractContextManager, asynccontextmanager
from typing import (
    Any,
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Optional,
    Tuple,
    TypeVar,
    Union,
)

from hivemind.utils.logging import get_logger

__all__ = [
    "switch_to_uvloop",
    "anext",
    "as_aiter",
    "iter_as_aiter",
    "azip",
    "achain",
    "aenumerate",
    "asingle",
    "afirst",
    "aiter_with_timeout",
    "attach_event_on_finished",
    "amap_in_executor",
    "cancel_and_wait",
    "enter_asynchronously",
    "await_with_timeout",
]

T = TypeVar("T")
logger = get_logger(__name__)

_NOTHING = object()


def switch_to_uvloop() -> asyncio.AbstractEventLoop:
    """Make uvloop the event loop policy (when installed) and return a fresh event loop set as the current one."""
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        logger.debug("uvloop is not installed, using the default asyncio event loop")
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    return loop


async def anext(aiter: AsyncIterator[T], default: Any = _NOTHING) -> T:
    """Return the next item of an async iterator (the builtin exists only since Python 3.10)."""
    try:
        return await aiter.__anext__()
    except StopAsyncIteration:
        if default is _NOTHING:
            raise
        return default


async def as_aiter(*values: T) -> AsyncIterator[T]:
    """Yield the given values asynchronously: ``as_aiter(1, 2)`` -> 1, 2."""
    for value in values:
        yield value


async def iter_as_aiter(iterable: Iterable[T]) -> AsyncGenerator[T, None]:
    """Wrap a regular iterable into an async iterator."""
    for value in iterable:
        yield value


async def azip(*iterables: AsyncIterable) -> AsyncIterator[Tuple]:
    """Async version of zip: stops as soon as any of the iterables is exhausted."""
    iterators = [iterable.__aiter__() for iterable in iterables]
    if not iterators:
        return
    while True:
        try:
            yield tuple([await iterator.__anext__() for iterator in iterators])
        except StopAsyncIteration:
            return


async def achain(*iterables: AsyncIterable[T]) -> AsyncIterator[T]:
    """Async version of itertools.chain."""
    for iterable in iterables:
        async for item in iterable:
            yield item


async def aenumerate(iterable: AsyncIterable[T], start: int = 0) -> AsyncIterator[Tuple[int, T]]:
    """Async version of enumerate."""
    index = start
    async for item in iterable:
        yield index, item
        index += 1


async def asingle(iterable: AsyncIterable[T]) -> T:
    """Return the only item of an async iterable; raise ValueError if it yields zero or several items."""
    result = _NOTHING
    async for item in iterable:
        if result is not _NOTHING:
            raise ValueError("asingle: the iterable yielded more than one item")
        result = item
    if result is _NOTHING:
        raise ValueError("asingle: the iterable yielded no items")
    return result


async def afirst(iterable: AsyncIterable[T], default: Optional[T] = None) -> Optional[T]:
    """Return the first item of an async iterable, or ``default`` if it is empty."""
    async for item in iterable:
        return item
    return default


async def aiter_with_timeout(iterable: AsyncIterable[T], timeout: Optional[float]) -> AsyncGenerator[T, None]:
    """Iterate, raising asyncio.TimeoutError if the next item takes more than ``timeout`` seconds to arrive."""
    iterator = iterable.__aiter__()
    while True:
        try:
            item = await await_with_timeout(iterator.__anext__(), timeout)
        except StopAsyncIteration:
            return
        yield item


async def attach_event_on_finished(iterable: AsyncIterable[T], event: asyncio.Event) -> AsyncIterator[T]:
    """Re-yield items of ``iterable`` and set ``event`` once it is exhausted, fails or is closed."""
    try:
        async for item in iterable:
            yield item
    finally:
        event.set()


async def await_with_timeout(awaitable: Awaitable[T], timeout: Optional[float]) -> T:
    """``await awaitable``, raising ``asyncio.TimeoutError`` after ``timeout`` seconds (None: no limit).

    Unlike ``asyncio.wait_for`` before Python 3.12, a cancellation that arrives just as ``awaitable`` finishes is never
    lost: the caller always sees its ``CancelledError``.
    """
    if timeout is None:
        return await awaitable
    if sys.version_info >= (3, 11):
        async with asyncio.timeout(timeout):
            return await awaitable
    task, expired = asyncio.current_task(), []
    timer = asyncio.get_running_loop().call_later(timeout, lambda: expired.append(True) or task.cancel())
    try:
        return await awaitable
    except asyncio.CancelledError:
        if expired:
            raise asyncio.TimeoutError(f"no result within {timeout} s") from None
        raise
    finally:
        timer.cancel()


async def cancel_and_wait(task: asyncio.Future) -> bool:
    """Cancel a task and wait for it to finish. Returns True if it ended cancelled, False if it completed anyway.

    An exception raised by the task (other than cancellation) is re-raised.
    """
    task.cancel()
    try:
        await task
        return False
    except asyncio.CancelledError:
        if not task.cancelled():  # we were cancelled ourselves, not the task
            raise
        return True


async def amap_in_executor(
    func: Callable[..., T],
    *iterables: AsyncIterable,
    max_prefetch: int = 1,
    executor: Optional[concurrent.futures.Executor] = None,
) -> AsyncIterator[T]:
    """Apply ``func`` in an executor to items of the zipped async iterables, running up to ``max_prefetch`` calls
    ahead of the consumer. Results are yielded in input order; an exception of ``func`` is raised to the consumer."""
    if max_prefetch < 1:
        raise ValueError(f"max_prefetch must be at least 1, got {max_prefetch}")
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue(max_prefetch)

    async def _producer():
        try:
            async for args in azip(*iterables):
                pending_call = loop.run_in_executor(executor, func, *args)
                await queue.put(pending_call)
            await queue.put(None)
        except Exception as e:
            future = loop.create_future()
            future.set_exception(e)
            await queue.put(future)
            raise

    producer = asyncio.create_task(_producer())
    try:
        while True:
            future = await queue.get()
            if future is None:
                break
            yield await future
        await producer
    finally:
        if not producer.done():
            producer.cancel()
        while not queue.empty():
            pending = queue.get_nowait()
            if pending is not None:
                pending.cancel()
        try:
            await producer
        except BaseException:  # noqa: B036 - the producer's error was already delivered through the queue
            pass


def _as_context(context: Union[AbstractContextManager, Any]) -> AbstractContextManager:
    if not hasattr(context, "__enter__") or not hasattr(context, "__exit__"):
        raise TypeError(f"enter_asynchronously expects a context manager, got {type(context).__name__}")
    return context


@asynccontextmanager
async def enter_asynchronously(context: AbstractContextManager) -> AsyncIterator[Any]:
    """Enter a blocking context manager (e.g. a multiprocessing lock) in a thread without blocking the event loop.

    Usage: ``async with enter_asynchronously(lock): ...``. The context is exited synchronously.
    """
    context = _as_context(context)
    loop = asyncio.get_running_loop()
    enter_future = loop.run_in_executor(None, context.__enter__)
    try:
        value = await asyncio.shield(enter_future)
    except asyncio.CancelledError:
        # the thread may still acquire the context after we were cancelled: release it as soon as it does
        def _release_when_entered(fut: asyncio.Future):
            if not fut.cancelled() and fut.exception() is None:
                context.__exit__(None, None, None)

        enter_future.add_done_callback(_release_when_entered)
        raise
    exc_info = (None, None, None)
    try:
        yield value
    except BaseException as e:
        exc_info = (type(e), e, e.__traceback__)
        if not context.__exit__(*exc_info):
            raise
    else:
        context.__exit__(*exc_info)
