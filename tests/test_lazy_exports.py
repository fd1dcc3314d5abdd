"""hivemind.utils.lazy_exports (the lazy ``__init__`` of hivemind.moe, hivemind.optim, ...): names load on first use
from any thread, and the package behaves as an eager one for hasattr and dir."""

import os
import signal
import sys
import textwrap
import threading
import time

import pytest

import hivemind
import hivemind.moe
import hivemind.optim

PACKAGE = "lazy_exports_probe_pkg"


@pytest.fixture
def probe_package(tmp_path):
    """A package exporting A and B lazily; pkg.sub is an eager package (its __init__ imports from pkg.sub.x) that A and
    B reach in opposite orders, with sleeps so that two threads loading A and B at once interleave."""
    root = tmp_path / PACKAGE
    (root / "sub").mkdir(parents=True)
    files = {
        "__init__.py": f"""
            from hivemind.utils.lazy_exports import lazy_exports
            _EXPORTS = {{"A": "{PACKAGE}.a", "B": "{PACKAGE}.b"}}
            __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
            """,
        "a.py": f"""
            import time
            time.sleep(0.5)
            import {PACKAGE}.sub.x
            A = "a"
            """,
        "b.py": f"""
            import {PACKAGE}.sub
            B = "b"
            """,
        "sub/__init__.py": f"""
            import time
            time.sleep(1.0)
            from {PACKAGE}.sub.x import X
            """,
        "sub/x.py": f"""
            import {PACKAGE}.sub  # (waits for pkg.sub while another thread runs its __init__)
            X = 1
            """,
    }
    for name, text in files.items():
        (root / name).write_text(textwrap.dedent(text))
    sys.path.insert(0, str(tmp_path))
    try:
        yield
    finally:
        sys.path.remove(str(tmp_path))
        for name in [name for name in sys.modules if name.split(".")[0] == PACKAGE]:
            del sys.modules[name]


@pytest.mark.timeout(60)
def test_two_threads_loading_lazy_names_at_once(probe_package):
    """Without one lock over lazy loads, thread A holds the import lock of pkg.sub.x waiting for pkg.sub, whose
    __init__ (thread B) waits for pkg.sub.x: Python reports a deadlock and one of the names fails to load."""
    package = __import__(PACKAGE)
    results, errors = {}, []

    def load(name):
        try:
            results[name] = getattr(package, name)
        except BaseException as e:  # noqa: BLE001 - the failure is the outcome under test
            errors.append(f"{name}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=load, args=(name,)) for name in ("A", "B")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not errors
    assert results == {"A": "a", "B": "b"}


def test_hasattr_and_dir_behave_as_eager_packages():
    for package in (hivemind.moe, hivemind.moe.server, hivemind.optim):
        assert not hasattr(package, "no_such.module")  # (a dotted name is no submodule: False, not an ImportError)
        assert not hasattr(package, "no_such_module")
        assert "lazy_exports" not in dir(package)
    # submodules are listed before their first import, as an eager package lists those its __init__ imported
    assert {"client", "server", "expert_uid"} <= set(dir(hivemind.moe))
    assert {"layers", "runtime", "dht_handler"} <= set(dir(hivemind.moe.server))
    assert {"optimizer", "progress_tracker", "grad_scaler"} <= set(dir(hivemind.optim))


@pytest.mark.timeout(60)
def test_a_process_forked_during_a_lazy_load_loads_lazy_names(probe_package):
    """The lock over lazy loads, held by a thread of the parent at fork time, must not stay held in the child (where
    that thread does not exist): the child's first lazy name would wait forever."""
    package = __import__(PACKAGE)
    loader = threading.Thread(target=getattr, args=(package, "A"))  # a.py sleeps 0.5 s under the lock
    loader.start()
    time.sleep(0.2)
    pid = os.fork()
    if pid == 0:  # the child: load another lazy name, exit 0 if it did
        try:
            os._exit(0 if package.B == "b" else 1)
        finally:
            os._exit(2)
    loader.join(timeout=30)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.1)
    else:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("the forked child waited 20 s for a lazy name (the lock stayed held)")
    assert os.waitstatus_to_exitcode(status) == 0
