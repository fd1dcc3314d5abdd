"""hivemind.utils: building blocks shared by every layer (logging, serialization, futures, storage, keys, ...).

Importing this package does not import torch: names that need it (TensorDescriptor, streaming helpers) are loaded
lazily on first access.
"""

import importlib
import importlib.util

from hivemind.utils import asyncio as _async_helpers
from hivemind.utils.asyncio import *  # noqa: F403 - every name in its __all__
from hivemind.utils.logging import get_logger, use_hivemind_log_handler
from hivemind.utils.mpfuture import MPFuture
from hivemind.utils.nested import nested_compare, nested_flatten, nested_map, nested_pack
from hivemind.utils.performance_ema import PerformanceEMA
from hivemind.utils.serializer import MSGPackSerializer, SerializerBase
from hivemind.utils.timed_storage import (
    MAX_DHT_TIME_DISCREPANCY_SECONDS,
    DHTExpiration,
    TimedStorage,
    ValueWithExpiration,
    get_dht_time,
)

__all__ = [
    *_async_helpers.__all__,
    "get_logger",
    "use_hivemind_log_handler",
    "MPFuture",
    "nested_compare",
    "nested_flatten",
    "nested_map",
    "nested_pack",
    "PerformanceEMA",
    "MSGPackSerializer",
    "SerializerBase",
    "MAX_DHT_TIME_DISCREPANCY_SECONDS",
    "DHTExpiration",
    "TimedStorage",
    "ValueWithExpiration",
    "get_dht_time",
]

# names provided by modules that import torch, resolved on first access (PEP 562)
_LAZY_NAMES = {
    "TensorDescriptor": "hivemind.utils.tensor_descr",
    "BatchTensorDescriptor": "hivemind.utils.tensor_descr",
    "split_for_streaming": "hivemind.utils.streaming",
    "combine_from_streaming": "hivemind.utils.streaming",
}

# star-imports include them only once the providing module exists (they come from the compression work)
__all__ += [name for name, module in _LAZY_NAMES.items() if importlib.util.find_spec(module) is not None]


def __getattr__(name: str):
    module_name = _LAZY_NAMES.get(name)
    if module_name is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value
