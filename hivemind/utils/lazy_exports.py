"""Package ``__init__`` attributes imported on first use (PEP 562), so that importing a package stays light.

The DHT process imports the modules of the coroutines and record schemas that mixtures, expert servers and optimizers
send it, and so the ``__init__`` of every package above them: those packages export their torch-based classes lazily,
and the DHT process never imports torch (see docs/moe.md). ``from package import Name``, ``package.Name``,
``package.submodule`` and ``from package import *`` behave as with eager imports.
"""

import importlib
import importlib.util
import sys
from typing import Callable, Dict, List, Tuple

__all__ = ["lazy_exports"]


def lazy_exports(package: str, exports: Dict[str, str]) -> Tuple[Callable[[str], object], Callable[[], List[str]]]:
    """(``__getattr__``, ``__dir__``) for ``package``, whose ``exports`` maps each name to the module defining it."""

    def __getattr__(name: str):
        namespace = vars(sys.modules[package])
        if name in exports:
            value = getattr(importlib.import_module(exports[name]), name)
            namespace[name] = value
            return value
        if not name.startswith("__") and importlib.util.find_spec(f"{package}.{name}") is not None:
            return importlib.import_module(f"{package}.{name}")  # (the import binds it in the namespace too)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> List[str]:
        return sorted(set(vars(sys.modules[package])) | set(exports))

    return __getattr__, __dir__
