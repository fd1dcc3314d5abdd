"""Shared fixtures: real p2pd peers on 127.0.0.1, and a session-end check that no p2pd started here survives."""

import asyncio
import gc
import logging
import os
import uuid
from typing import AsyncIterator, Callable, Iterator, List, Tuple

import psutil
import pytest

from hivemind.p2p import P2P
from hivemind.p2p.p2p_daemon_bindings import shm_pipe

# every p2pd started by this test process (directly or through child processes) inherits this marker
TEST_MARKER_ENV = "HIVEMIND_TEST_RUN_MARKER"
TEST_MARKER = f"{os.getpid()}-{uuid.uuid4().hex}"
os.environ[TEST_MARKER_ENV] = TEST_MARKER


def find_marked_p2pd_processes() -> List[psutil.Process]:
    """p2pd processes (any parent) that carry this test session's environment marker."""
    found = []
    for process in psutil.process_iter(["name"]):
        try:
            if process.info["name"] != "p2pd":
                continue
            if process.environ().get(TEST_MARKER_ENV) == TEST_MARKER and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def pytest_sessionfinish(session, exitstatus):
    leftovers = find_marked_p2pd_processes()
    if not leftovers:
        return
    details = []
    for process in leftovers:
        try:
            details.append(f"pid {process.pid} ({' '.join(process.cmdline()[:1])})")  # before kill() makes a zombie
            process.kill()
        except psutil.Error:
            pass
    details = ", ".join(details)
    print(
        f"\nERROR: {len(leftovers)} p2pd process(es) started by the tests were still running: {details or leftovers}"
    )
    session.exitstatus = 1


@pytest.fixture
async def p2p_factory() -> AsyncIterator[Callable[..., "asyncio.Future[P2P]"]]:
    """``await p2p_factory(**create_kwargs)`` starts a peer that is shut down after the test."""
    instances: List[P2P] = []

    async def create(**kwargs) -> P2P:
        p2p = await P2P.create(**kwargs)
        instances.append(p2p)
        return p2p

    yield create
    await asyncio.gather(*(p2p.shutdown() for p2p in instances), return_exceptions=True)


@pytest.fixture
async def p2p_pair(p2p_factory) -> Tuple[P2P, P2P]:
    """Two peers on 127.0.0.1; the second bootstraps from the first, so they are connected."""
    first = await p2p_factory()
    second = await p2p_factory(initial_peers=await first.get_visible_maddrs())
    for peer in (first, second):
        await peer.wait_for_at_least_n_peers(1, attempts=100, delay=0.05)
    return first, second


if os.environ.get("HIVEMIND_TEST_UVLOOP") == "1":

    def pytest_asyncio_loop_factories(config, item):
        """Run every async test on uvloop (opt-in with HIVEMIND_TEST_UVLOOP=1, as hivemind's own processes do)."""
        import uvloop

        return {"uvloop": uvloop.new_event_loop}


@pytest.fixture
def frozen_heap() -> Iterator[None]:
    """
    For tests that bound the CPU time a node spends: every object alive before the test is collected or frozen, so a
    garbage collection during the test scans only what the test made. Late in a full run an xdist worker holds
    millions of objects from earlier tests, and one full collection over them inside a measured window took 0.3-0.5 s
    of CPU, 3-5x what the measured work itself costs (the test's own objects are still scanned, as when run alone).
    """
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


@pytest.fixture(params=["1", "0"], ids=["shm-pipes", "sockets"])
def pipes_setting(request, monkeypatch) -> str:
    """Streams through shared-memory pipes where p2pd offers them, or plain sockets only."""
    monkeypatch.setenv(shm_pipe.SHM_ENV_VAR, request.param)
    return request.param


class _WarningsRecorder(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.messages: List[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def hivemind_warnings() -> Iterator[List[str]]:
    """The messages of the warnings (and worse) that the ``hivemind`` loggers log during the test."""
    recorder = _WarningsRecorder()
    logger = logging.getLogger("hivemind")
    logger.addHandler(recorder)
    try:
        yield recorder.messages
    finally:
        logger.removeHandler(recorder)
