"""Waiting in asyncio tests for a condition that another task or process makes true (instead of a fixed sleep)."""

import asyncio
import time
from typing import Callable


async def wait_until(condition: Callable[[], bool], what: str = "the condition", timeout: float = 20.0) -> None:
    """Poll ``condition`` every 10 ms; fail the test, naming ``what``, if it is still false after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        await asyncio.sleep(0.01)
