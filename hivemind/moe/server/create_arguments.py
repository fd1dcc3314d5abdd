"""Checks of Server.create's arguments that would otherwise pass and fail later (at every client call, or with an
error about a multiaddr or uid made of single characters)."""

import numbers
from typing import Any

from hivemind.proto.runtime_pb2 import CompressionType


def check_create_arguments(*, compression: Any, initial_peers: Any, expert_uids: Any) -> None:
    if isinstance(compression, bool) or not isinstance(compression, numbers.Integral):
        raise TypeError(
            f"compression must be a CompressionType value such as CompressionType.FLOAT16 "
            f"(from hivemind.proto.runtime_pb2 import CompressionType), "
            f"got {type(compression).__name__} {compression!r}"
        )
    if compression not in CompressionType.values():
        known = ", ".join(f"CompressionType.{name}" for name in CompressionType.keys())
        raise ValueError(f"compression must be one of {known}, got {compression}")
    for name, value, what in (("initial_peers", initial_peers, "multiaddrs"), ("expert_uids", expert_uids, "uids")):
        if isinstance(value, (str, bytes)):
            raise TypeError(f"{name} must be a list of {what}, got a single {type(value).__name__}: pass [{value!r}]")
