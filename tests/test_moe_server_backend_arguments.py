"""ModuleBackend and Server refuse arguments that could not work, naming them: a single descriptor or a tensor as
args_schema ("'BatchTensorDescriptor' object is not iterable", "Boolean value of Tensor ... is ambiguous"), an
optimizer class (accepted; the first backward failed inside the runtime), a function as module, a list of
backends, or a Server without a DHT (accepted; run() and shutdown() failed with AttributeError)."""

import pytest
import torch

from hivemind.dht import DHT
from hivemind.moe import ModuleBackend, Server
from hivemind.utils.tensor_descr import BatchTensorDescriptor

SCHEMA = (BatchTensorDescriptor(4),)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(args_schema=BatchTensorDescriptor(4)), r"args_schema must be a tuple of BatchTensorDescriptor.*\(Batch"),
        (dict(args_schema=torch.zeros(4)), "args_schema must be a tuple of BatchTensorDescriptor"),
        (dict(kwargs_schema=[BatchTensorDescriptor(4)]), r"kwargs_schema must be a dict \{name: BatchTensorDescr"),
        (dict(optimizer=torch.optim.Adam), r"optimizer must be an optimizer instance.*Adam\(module.parameters\(\)"),
        (dict(module=lambda x: x), r"module must be a torch.nn.Module"),
    ],
    ids=["one-descriptor", "tensor", "kwargs-list", "optimizer-class", "function"],
)
def test_module_backend_refuses_unworkable_arguments(overrides, message):
    kwargs = dict(name="e.0", module=torch.nn.Linear(4, 4), args_schema=SCHEMA, max_batch_size=8)
    kwargs.update(overrides)
    with pytest.raises(TypeError, match=message):
        ModuleBackend(**kwargs)


@pytest.fixture(scope="module")
def backend():
    return ModuleBackend("e.0", torch.nn.Linear(4, 4), args_schema=SCHEMA, max_batch_size=8)


@pytest.mark.parametrize("dht", [None, "dht"])
def test_server_refuses_something_that_is_not_a_dht(backend, dht):
    with pytest.raises(TypeError, match="dht must be a running hivemind.DHT"):
        Server(dht, {"e.0": backend})


def test_server_refuses_a_list_of_backends_and_a_non_numeric_update_period(backend):
    with DHT(start=True) as dht:
        with pytest.raises(TypeError, match=r"module_backends must be a dict \{uid: ModuleBackend\}"):
            Server(dht, [backend])
        with pytest.raises(TypeError, match="update_period must be a positive number of seconds"):
            Server(dht, {"e.0": backend}, update_period="30")
