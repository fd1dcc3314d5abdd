"""Tearing down the averager process's event loop at shutdown: work handed to threads, tasks still running, and its
client of the DHT's p2pd, each within a time budget."""

import asyncio
from typing import Optional

from hivemind.p2p import P2P
from hivemind.utils.asyncio import await_with_timeout
from hivemind.utils.logging import get_logger

logger = get_logger(__name__)


def let_threads_end(loop: asyncio.AbstractEventLoop, timeout: float) -> None:
    """Wait up to ``timeout`` seconds for the work that the loop handed to threads (e.g. adding a round's result to
    the averaged tensors, which holds their lock) to end: the process exits without waiting for threads, and a lock
    held by a thread that the exit killed would stay held, so that ``get_tensors()`` blocks forever in the user's
    process."""
    try:
        loop.run_until_complete(await_with_timeout(loop.shutdown_default_executor(), timeout))
    except asyncio.TimeoutError:
        logger.warning(f"Work in the averager's threads did not end within {timeout:.2f} s of its shutdown")
    except Exception as e:
        logger.debug(f"Could not wait for the averager's threads at shutdown: {e!r}")


def cancel_remaining_tasks(loop: asyncio.AbstractEventLoop, timeout: float) -> None:
    """Cancel the tasks still running in ``loop`` (e.g. downloads of our state in progress) and wait up to
    ``timeout`` seconds for them to end, as asyncio.run does before closing its loop: a task left running would still
    be inside its async generators when the loop closes them ("asynchronous generator is already running")."""
    tasks = [task for task in asyncio.all_tasks(loop) if not task.done()]
    if not tasks:
        return
    for task in tasks:
        task.cancel()
    _, still_running = loop.run_until_complete(asyncio.wait(tasks, timeout=timeout))
    if still_running:
        logger.debug(f"{len(still_running)} tasks did not end within {timeout} s of being cancelled at shutdown")
    for task in tasks:
        if task.done() and not task.cancelled() and task.exception() is not None:
            logger.debug(f"A task failed while being cancelled at shutdown: {task.exception()!r}")


def close_p2p_client(loop: asyncio.AbstractEventLoop, p2p: Optional[P2P], timeout: float) -> None:
    """Close this process's client of the DHT's p2pd (the daemon runs on): the process ends with os._exit, and the
    Unix socket the client listened on would otherwise stay in the temporary directory."""
    if p2p is None:
        return
    try:
        loop.run_until_complete(await_with_timeout(p2p.shutdown(), timeout))
    except Exception as e:
        logger.debug(f"Could not close the averager's P2P client at shutdown: {e!r}")
