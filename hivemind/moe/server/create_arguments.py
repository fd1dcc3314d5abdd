"""Checks of the arguments of Server, Server.create and ModuleBackend that would otherwise pass and fail later (at
every client call, at the first backward, at shutdown) or with an error from an internal line."""

from typing import Any, Mapping

import torch

from hivemind.dht.dht import check_dht_argument
from hivemind.moe.server.expert_pattern import parse_expert_pattern
from hivemind.proto.runtime_pb2 import CompressionType
from hivemind.utils.tensor_descr import BatchTensorDescriptor
from hivemind.utils.value_checks import is_integer, is_number


def check_create_arguments(compression: Any, initial_peers: Any, expert_uids: Any, expert_pattern: Any) -> None:
    if expert_pattern is not None:  # (a ValueError naming the block; else only after the DHT started)
        parse_expert_pattern(expert_pattern)
    if not is_integer(compression):
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


def check_server_arguments(*, dht: Any, module_backends: Any, update_period: Any) -> None:
    check_dht_argument(dht)
    if not isinstance(module_backends, Mapping):
        raise TypeError(f"module_backends must be a dict {{uid: ModuleBackend}}, got {type(module_backends).__name__}")
    if not is_number(update_period):
        raise TypeError(f"update_period must be a positive number of seconds, got {update_period!r}")


def check_backend_arguments(module: Any, optimizer: Any, args_schema: Any, kwargs_schema: Any) -> None:
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    if isinstance(optimizer, type):  # its first step() would fail inside the runtime, at the first backward
        raise TypeError(
            f"optimizer must be an optimizer instance, e.g. {optimizer.__name__}(module.parameters()), got the class"
        )
    if args_schema is not None and (
        not isinstance(args_schema, (tuple, list))
        or not all(isinstance(descriptor, BatchTensorDescriptor) for descriptor in args_schema)
    ):
        raise TypeError(
            f"args_schema must be a tuple of BatchTensorDescriptor, e.g. (BatchTensorDescriptor(hidden_dim),), "
            f"got {args_schema!r}"
        )
    if kwargs_schema is not None and not isinstance(kwargs_schema, Mapping):
        raise TypeError(f"kwargs_schema must be a dict {{name: BatchTensorDescriptor}}, got {kwargs_schema!r}")
