"""The harness itself: each process loads the implementation it should, and nothing outlives a peer."""

import os
import sys

import psutil
import pytest

from .conftest import SIDE_IMPLEMENTATION
from .harness import INTEROP_DIR, ORIGINAL_VERSION, REPO, HarnessError, PeerProcess, check_implementation

pytestmark = [pytest.mark.interop, pytest.mark.timeout(60)]


def test_check_implementation_accepts_only_the_expected_library():
    original_file = str(INTEROP_DIR / "venv/lib/python3.11/site-packages/hivemind/__init__.py")
    check_implementation("original", ORIGINAL_VERSION, original_file)
    check_implementation("ours", "1.2.0.dev0", str(REPO / "hivemind" / "__init__.py"))
    with pytest.raises(HarnessError, match="expected the original hivemind"):
        check_implementation("original", "1.2.0.dev0", str(REPO / "hivemind" / "__init__.py"))
    with pytest.raises(HarnessError, match="expected the ours hivemind"):
        check_implementation("ours", ORIGINAL_VERSION, original_file)


@pytest.mark.parametrize("side", ["original", "ours"])
def test_peer_process_loads_its_implementation_and_leaves_no_process_behind(original_env, interop_log_dir, side):
    implementation = SIDE_IMPLEMENTATION[side]
    peer = PeerProcess(implementation, interop_log_dir, name=f"harness-{side}")
    try:
        if implementation == "original":
            assert peer.version == ORIGINAL_VERSION and peer.file.startswith(str(INTEROP_DIR.resolve()))
        else:
            assert peer.version != ORIGINAL_VERSION and peer.file == str((REPO / "hivemind/__init__.py").resolve())
        peer.call("p2p_create")
        peer.call("dht_create")
        tree = psutil.Process(peer.proc.pid).children(recursive=True)
        assert any(p.name() == "p2pd" for p in tree), [p.name() for p in tree]
    finally:
        peer.close(graceful=False)  # the hard way: kill the driver, its DHT process and both daemons
    assert not [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def test_this_process_never_imports_the_original():
    interop_dir = os.path.realpath(INTEROP_DIR)
    leaked = [
        name
        for name, module in list(sys.modules.items())
        if os.path.realpath(getattr(module, "__file__", None) or "").startswith(interop_dir + os.sep)
    ]
    assert not leaked
