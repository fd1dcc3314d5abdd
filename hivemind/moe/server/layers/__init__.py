"""Expert classes that a server can host, by name, and helpers to add more from a Python file."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Union

from hivemind.moe.server.layers import common, dropout  # noqa: F401 - importing registers the built-in experts
from hivemind.moe.server.layers.custom_experts import name_to_block, name_to_input, register_expert_class
from hivemind.moe.server.layers.lr_schedule import get_linear_schedule_with_warmup
from hivemind.moe.server.layers.optim import ClippingWrapper

__all__ = [
    "name_to_block",
    "name_to_input",
    "register_expert_class",
    "schedule_name_to_scheduler",
    "add_custom_models_from_file",
    "get_linear_schedule_with_warmup",
    "ClippingWrapper",
]

# scheduler name -> factory(optimizer, num_warmup_steps, num_training_steps), or None for a constant learning rate
schedule_name_to_scheduler = dict(linear=get_linear_schedule_with_warmup, none=None)


def add_custom_models_from_file(path: Union[str, os.PathLike]) -> None:
    """Run a Python file that registers expert classes with ``@register_expert_class(name, sample_input)``.

    A file is run once per process: loading the same path again does nothing.
    :raises FileNotFoundError: if there is no such file
    """
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"custom expert module {str(path)!r} does not exist or is not a file")
    module_name = f"hivemind_custom_experts_{hashlib.sha1(str(path).encode()).hexdigest()[:16]}"
    if module_name in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {str(path)!r} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    registered_before = set(name_to_block)
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        for name in set(name_to_block) - registered_before:  # a fixed file can then be loaded again
            del name_to_block[name], name_to_input[name]
        raise
