"""Package ``__init__`` attributes imported on first use (PEP 562), so that importing a package stays light.

The DHT process imports the modules of the coroutines and record schemas that mixtures, expert servers and optimizers
send it, and so the ``__init__`` of every package above them: those packages export their torch-based classes lazily,
and the DHT process never imports torch (see docs/moe.md). ``from package import Name``, ``package.Name``,
``package.submodule``, ``from package import *``, ``hasattr`` and ``dir`` behave as with eager imports.

Lazy loads run one at a time (one lock for every package): two threads loading names whose modules import each
other's packages (e.g. hivemind.optim.Optimizer and hivemind.optim.TrainingAverager, which both reach the eager
hivemind.averaging) could otherwise each hold an import lock the other waits for, and one got a partially
initialized module (ImportError). An eager ``__init__`` serialized them the same way. A forked child gets a fresh
lock, so that a load running in another thread of the parent at fork time does not block it.
"""

import importlib
import importlib.util
import os
import pkgutil
import sys
import threading
from types import ModuleType
from typing import Callable, Dict, List, Tuple

__all__ = ["lazy_exports", "import_lazily"]

_LAZY_IMPORT_LOCK = threading.RLock()


def _release_in_forked_child() -> None:  # a thread that held the lock at fork time does not exist in the child
    global _LAZY_IMPORT_LOCK
    _LAZY_IMPORT_LOCK = threading.RLock()


os.register_at_fork(after_in_child=_release_in_forked_child)


def import_lazily(module_name: str) -> ModuleType:
    """``importlib.import_module`` for a lazy name, one at a time in this process (see the module docstring)."""
    with _LAZY_IMPORT_LOCK:
        return importlib.import_module(module_name)


def lazy_exports(package: str, exports: Dict[str, str]) -> Tuple[Callable[[str], object], Callable[[], List[str]]]:
    """(``__getattr__``, ``__dir__``) for ``package``, whose ``exports`` maps each name to the module defining it."""

    def __getattr__(name: str):
        namespace = vars(sys.modules[package])
        if name in exports:
            value = getattr(import_lazily(exports[name]), name)
            namespace[name] = value
            return value
        if not name.startswith("__") and "." not in name:
            if importlib.util.find_spec(f"{package}.{name}") is not None:
                return import_lazily(f"{package}.{name}")  # (the import binds it in the namespace too)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> List[str]:
        module = sys.modules[package]
        submodules = {info.name for info in pkgutil.iter_modules(module.__path__)}
        return sorted(set(vars(module)) | set(exports) | submodules)

    return __getattr__, __dir__
