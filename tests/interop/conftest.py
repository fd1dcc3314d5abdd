"""Fixtures for interop tests: peers of the original hivemind 1.1.12 and of ours, each in its own interpreter.

The original's environment is created on demand by tests/interop/setup_original_env.sh (cached under .interop/);
tests are skipped, with the reason, only when it cannot be created (e.g. the package registry is unreachable).

HIVEMIND_INTEROP_PAIR="original,original" runs every test with the original on both sides: a baseline that
proves the harness and the tests themselves.
"""

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Dict, Iterator, List

import pytest

from .harness import IMPLEMENTATIONS, CliProcess, PeerProcess, ensure_original_env

ORIGINAL, OURS = "original", "ours"  # the two sides of every test

_pair = tuple(os.environ.get("HIVEMIND_INTEROP_PAIR", "original,ours").split(","))
if len(_pair) != 2 or not set(_pair) <= set(IMPLEMENTATIONS):
    raise ValueError(f"HIVEMIND_INTEROP_PAIR must be two of {IMPLEMENTATIONS} separated by a comma, got {_pair}")
SIDE_IMPLEMENTATION = {ORIGINAL: _pair[0], OURS: _pair[1]}  # which library each side really runs
DIRECTIONS = [(ORIGINAL, OURS), (OURS, ORIGINAL)]  # (first side, second side): each test runs both ways
DIRECTION_IDS = ["original-to-ours", "ours-to-original"]


@contextmanager
def driver_per_side(log_dir: Path, name: str, driver: Path) -> Iterator[Dict[str, PeerProcess]]:
    """One ``driver`` process per side ({ORIGINAL: ..., OURS: ...}), named ``<side>-<name>``, all closed on exit."""
    started = {}
    try:
        for side in (ORIGINAL, OURS):
            started[side] = PeerProcess(SIDE_IMPLEMENTATION[side], log_dir, name=f"{side}-{name}", driver=driver)
        yield started
    finally:
        for process in started.values():
            process.close()


@pytest.fixture(scope="session")
def original_env() -> None:
    problem = ensure_original_env()
    if problem is not None:
        pytest.skip(f"interop tests need the original hivemind 1.1.12 environment: {problem}")


@pytest.fixture(scope="session")
def interop_log_dir(tmp_path_factory) -> Path:
    """Each peer's stderr (library logs, p2pd errors) is kept here; failure messages quote the tail."""
    return tmp_path_factory.mktemp("interop-logs")


@pytest.fixture(scope="module")
def module_peers(original_env, interop_log_dir) -> Callable[..., PeerProcess]:
    """`module_peers(side, name)` starts a driven peer process that lives until the module ends."""
    peers: List[PeerProcess] = []

    def start(side: str, name: str) -> PeerProcess:
        peer = PeerProcess(SIDE_IMPLEMENTATION[side], interop_log_dir, name=name)
        peers.append(peer)
        return peer

    yield start
    for peer in peers:
        peer.close()


@pytest.fixture
def cli_tools(original_env, interop_log_dir) -> Callable[..., CliProcess]:
    """`cli_tools(side, args)` runs that side's hivemind-dht; stopped (SIGINT, then killed) after the test."""
    tools: List[CliProcess] = []

    def start(side: str, args) -> CliProcess:
        tool = CliProcess(SIDE_IMPLEMENTATION[side], args, interop_log_dir, name=f"{side}-hivemind-dht")
        tools.append(tool)
        return tool

    yield start
    for tool in tools:
        tool.stop()
