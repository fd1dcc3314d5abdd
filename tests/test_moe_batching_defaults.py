"""The batching defaults of TaskPool, ModuleBackend, Server.create and hivemind-server, as the public API has them."""

import inspect

import pytest
import torch

from hivemind.hivemind_cli.run_server import make_parser
from hivemind.moe.server.module_backend import ModuleBackend
from hivemind.moe.server.server import Server
from hivemind.moe.server.task_pool import TaskPool
from hivemind.utils.tensor_descr import BatchTensorDescriptor


def defaults_of(function, *names):
    parameters = inspect.signature(function).parameters
    return {name: parameters[name].default for name in names}


def test_task_pool_defaults():
    assert defaults_of(TaskPool.__init__, "min_batch_size", "timeout", "pool_size", "prefetch_batches") == {
        "min_batch_size": 1,
        "timeout": None,
        "pool_size": None,  # no cap on waiting tasks
        "prefetch_batches": 1,
    }
    assert inspect.signature(TaskPool.__init__).parameters["max_batch_size"].default is inspect.Parameter.empty


def test_module_backend_requires_max_batch_size_and_passes_the_pool_defaults():
    schema = dict(args_schema=(BatchTensorDescriptor(4),), outputs_schema=BatchTensorDescriptor(4))
    with pytest.raises(TypeError, match="max_batch_size is required"):
        ModuleBackend("expert.0", torch.nn.Linear(4, 4), **schema)
    backend = ModuleBackend("expert.0", torch.nn.Linear(4, 4), max_batch_size=32, **schema)
    try:
        for pool in backend.get_pools():
            assert (pool.max_batch_size, pool.min_batch_size, pool.timeout) == (32, 1, None)
            assert (pool.pool_size, pool.prefetch_batches) == (None, 1)
    finally:
        for pool in backend.get_pools():
            pool.shutdown()


def test_server_create_defaults():
    assert defaults_of(Server.create, "min_batch_size", "max_batch_size") == {
        "min_batch_size": 1,
        "max_batch_size": 4096,
    }
    assert "pool_size" not in inspect.signature(Server.create).parameters  # its pools never cap waiting tasks


def test_hivemind_server_defaults():
    options = vars(make_parser().parse_args(["--num_experts", "1"]))
    assert (options["min_batch_size"], options["max_batch_size"]) == (1, 16384)
    assert "pool_size" not in options
