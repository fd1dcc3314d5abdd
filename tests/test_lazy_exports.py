"""hivemind.utils.lazy_exports (the lazy ``__init__`` of hivemind.moe, hivemind.optim, ...): names load on first use
from any thread, and the package behaves as an eager one for hasattr and dir."""

import sys
import textwrap
import threading

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
