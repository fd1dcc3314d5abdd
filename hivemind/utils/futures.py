"""Completing a ``concurrent.futures.Future`` (or an ``MPFuture``) that another thread may complete or cancel first."""

import concurrent.futures
from typing import Any


def complete(future: concurrent.futures.Future, result: Any) -> None:
    """``future.set_result(result)`` unless it was completed or cancelled meanwhile."""
    try:
        future.set_result(result)
    except concurrent.futures.InvalidStateError:
        pass


def fail(future: concurrent.futures.Future, exception: BaseException) -> None:
    """``future.set_exception(exception)`` unless it was completed or cancelled meanwhile."""
    try:
        future.set_exception(exception)
    except concurrent.futures.InvalidStateError:
        pass
