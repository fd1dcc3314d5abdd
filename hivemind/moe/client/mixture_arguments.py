"""Type and range checks of RemoteMixtureOfExperts' constructor arguments (TypeError/ValueError naming each)."""

from typing import Any, Dict, Optional

from hivemind.dht.dht import check_dht_argument
from hivemind.utils.value_checks import is_integer, is_number

# 0: once every sample has k_min answers, wait for no straggler (as hivemind 1.1.12 allows)
_MAY_BE_ZERO = ("timeout_after_k_min",)


def check_mixture_arguments(
    *, dht: Any, uid_prefix: Any, grid_size: Any, in_features: Any, ints: Dict[str, Any], timeouts: Dict[str, Any]
) -> None:
    """:param ints: the routing counts (k_best, k_min, ...) by name; :param timeouts: seconds or None, by name"""
    check_dht_argument(dht)
    if not isinstance(uid_prefix, str):
        raise TypeError(f"uid_prefix must be a str such as 'ffn.', got {type(uid_prefix).__name__}: {uid_prefix!r}")
    if isinstance(grid_size, (str, bytes)) or not hasattr(grid_size, "__iter__"):
        sizes: Optional[list] = None
    else:
        sizes = list(grid_size)
    if sizes is None or not all(is_integer(size) for size in sizes):
        raise TypeError(f"grid_size must be a sequence of positive ints, e.g. (4,) or (8, 8), got {grid_size!r}")
    if not is_integer(in_features):
        raise TypeError(f"in_features must be an int (the width of the input), got {in_features!r}")
    for name, value in ints.items():
        if not is_integer(value):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}: {value!r}")
    for name, value in timeouts.items():
        if value is None:
            continue
        if not is_number(value):
            raise TypeError(f"{name} must be None or a positive number of seconds, got {type(value).__name__}")
        if name in _MAY_BE_ZERO:
            if not value >= 0:  # (NaN too)
                raise ValueError(f"{name} must be None or a non-negative number of seconds, got {value}")
        elif not value > 0:  # (NaN too)
            raise ValueError(f"{name} must be None or a positive number of seconds, got {value}")
