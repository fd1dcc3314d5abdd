"""OpenDiLoCo (PrimeIntellect-ai/OpenDiloco) builds its DiLoCo optimizer on hivemind's internals: every import
path it uses must resolve here to an object of the same kind (see docs/compatibility.md, "OpenDiLoCo")."""

import importlib
import inspect
import logging

import pytest
import torch

# (module, name, check) for every `from hivemind... import name` in open_diloco/ and its tests
IMPORTED_NAMES = [
    ("hivemind", "DHT", inspect.isclass),
    ("hivemind", "NoCompression", inspect.isclass),
    ("hivemind", "Float16Compression", inspect.isclass),
    ("hivemind", "ScaledFloat16Compression", inspect.isclass),
    ("hivemind", "Uniform8BitQuantization", inspect.isclass),
    ("hivemind", "Quantile8BitQuantization", inspect.isclass),
    ("hivemind", "BlockwiseQuantization", inspect.isclass),
    ("hivemind.averaging.averager", "DecentralizedAverager", inspect.isclass),
    ("hivemind.averaging.control", "StepControl", inspect.isclass),
    ("hivemind.compression.base", "CompressionBase", inspect.isclass),
    ("hivemind.compression.base", "NoCompression", inspect.isclass),
    ("hivemind.dht", "DHT", inspect.isclass),
    ("hivemind.dht.dht", "DHT", inspect.isclass),
    ("hivemind.optim.optimizer", "Optimizer", inspect.isclass),
    ("hivemind.optim.optimizer", "logger", lambda value: isinstance(value, logging.Logger)),
    ("hivemind.optim.progress_tracker", "GlobalTrainingProgress", inspect.isclass),
    ("hivemind.optim.progress_tracker", "LocalTrainingProgress", inspect.isclass),
    ("hivemind.optim.progress_tracker", "ProgressTracker", inspect.isclass),
    ("hivemind.optim.progress_tracker", "TrainingProgressSchema", inspect.isclass),
    ("hivemind.optim.state_averager", "LRSchedulerBase", inspect.isclass),
    ("hivemind.optim.state_averager", "OptimizerFactory", lambda value: value is not None),
    ("hivemind.optim.state_averager", "Parameters", lambda value: value is not None),
    ("hivemind.optim.state_averager", "ParamGroups", lambda value: value is not None),
    ("hivemind.optim.state_averager", "SchedulerFactory", lambda value: value is not None),
    ("hivemind.optim.state_averager", "TorchOptimizer", lambda value: value is torch.optim.Optimizer),
    ("hivemind.optim.state_averager", "TrainingStateAverager", inspect.isclass),
    ("hivemind.utils", "get_dht_time", callable),
    ("hivemind.utils.crypto", "RSAPrivateKey", inspect.isclass),
    ("hivemind.utils.mpfuture", "MPFuture", inspect.isclass),
    ("hivemind.utils.networking", "log_visible_maddrs", callable),
    ("hivemind.utils.timed_storage", "DHTExpiration", lambda value: value is float),
]


@pytest.mark.parametrize("module, name, check", IMPORTED_NAMES, ids=[f"{m}.{n}" for m, n, _ in IMPORTED_NAMES])
def test_opendiloco_import_resolves(module, name, check):
    value = getattr(importlib.import_module(module), name)
    assert check(value), f"{module}.{name} is {value!r}"


def test_lr_scheduler_base_is_the_base_of_torch_schedulers():
    from hivemind.optim.state_averager import LRSchedulerBase

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    for scheduler in (
        torch.optim.lr_scheduler.StepLR(optimizer, step_size=1),
        torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0),
    ):
        assert isinstance(scheduler, LRSchedulerBase)


def test_optimizer_logger_is_the_module_logger_of_hivemind_optim():
    from hivemind.optim.optimizer import logger

    assert logger.name.startswith("hivemind.optim")


def test_mpfuture_reset_backend_keeps_futures_working_across_processes():
    import multiprocessing as mp

    from hivemind.utils.mpfuture import MPFuture

    def finish(future):
        future.set_result(42)

    futures = [MPFuture() for _ in range(2)]
    process = mp.get_context("fork").Process(target=finish, args=(futures[0],))
    process.start()
    assert futures[0].result(timeout=10) == 42
    process.join(10)
    MPFuture.reset_backend()
    process = mp.get_context("fork").Process(target=finish, args=(futures[1],))
    process.start()
    assert futures[1].result(timeout=10) == 42
    process.join(10)


def test_the_process_wide_key_that_opendiloco_tests_reset_exists():
    from hivemind.utils.crypto import RSAPrivateKey

    with RSAPrivateKey._process_wide_key_lock:
        RSAPrivateKey._process_wide_key = None
    assert isinstance(RSAPrivateKey.process_wide(), RSAPrivateKey)
