"""Runtime: serves the pools of its backends, oldest ready work first, and survives failing batches."""

import multiprocessing as mp
import queue
import re
import threading
from concurrent.futures import Future

import pytest
import torch
from torch import nn

from hivemind.moe.server.module_backend import ModuleBackend
from hivemind.moe.server.runtime import Runtime, _rate, _Stats
from hivemind.moe.server.task_pool import TaskPool
from hivemind.utils.tensor_descr import BatchTensorDescriptor


class FailOnNegative(nn.Module):
    def forward(self, x):
        if (x < 0).any():
            raise ValueError("negative input")
        return x + 1


class FakeBackend:
    """Just the pools, for tests that look at scheduling only."""

    def __init__(self, *pools):
        self.pools = pools

    def get_pools(self):
        return self.pools


@pytest.fixture
def runtime_factory():
    runtimes = []

    def make(module_backends, **kwargs):
        runtime = Runtime(module_backends, **kwargs)
        runtimes.append(runtime)
        return runtime

    yield make
    for runtime in runtimes:
        runtime.shutdown(timeout=10)


def test_runtime_serves_forward_and_backward(runtime_factory):
    module = nn.Linear(3, 2)
    backend = ModuleBackend(
        "expert.0",
        module,
        optimizer=torch.optim.SGD(module.parameters(), lr=0.5),
        args_schema=(BatchTensorDescriptor(3),),
        max_batch_size=8,
    )
    runtime = runtime_factory({"expert.0": backend})
    runtime.start()
    assert runtime.ready.wait(10)
    x = torch.randn(4, 3)
    expected = module(x).detach()
    (output,) = backend.forward_pool.submit_task(x).result(timeout=10)
    assert torch.allclose(output, expected)
    weight = module.weight.detach().clone()
    (grad,) = backend.backward_pool.submit_task(x, torch.ones(4, 2)).result(timeout=10)
    assert grad.shape == (4, 3)
    assert not torch.equal(module.weight, weight)  # trained on backward


def test_failing_batch_fails_only_its_tasks_and_the_runtime_goes_on(runtime_factory):
    backend = ModuleBackend("expert.0", FailOnNegative(), args_schema=(BatchTensorDescriptor(2),), max_batch_size=8)
    runtime = runtime_factory({"expert.0": backend})
    runtime.start()
    assert runtime.ready.wait(10)
    with pytest.raises(ValueError, match="negative input"):
        backend.forward_pool.submit_task(-torch.ones(1, 2)).result(timeout=10)
    assert runtime.is_alive()
    (output,) = backend.forward_pool.submit_task(torch.ones(3, 2)).result(timeout=10)
    assert torch.equal(output, torch.full((3, 2), 2.0))


def test_oldest_ready_work_is_served_first(runtime_factory):
    order = []
    gate = threading.Event()

    def make_func(name):
        def process(x):
            gate.wait(10)
            order.append(name)
            return x

        return process

    pools = {name: TaskPool(make_func(name), max_batch_size=4, name=name, start=True) for name in "abc"}
    futures = [pools[name].submit_task(torch.ones(1, 1)) for name in "bca"]  # b is oldest, then c, then a
    for pool in pools.values():
        assert pool.batch_receiver.poll(5)  # every pool has its batch ready before the runtime looks
    runtime = runtime_factory({"x": FakeBackend(*pools.values())})
    runtime.start()
    gate.set()
    for future in futures:
        future.result(timeout=10)
    assert order == ["b", "c", "a"]


def test_shutdown_stops_the_runtime_and_its_pools(runtime_factory):
    backend = ModuleBackend("expert.0", nn.Identity(), args_schema=(BatchTensorDescriptor(2),), max_batch_size=8)
    runtime = runtime_factory({"expert.0": backend})
    runtime.start()
    assert runtime.ready.wait(10)
    runtime.shutdown(timeout=10)
    assert not runtime.is_alive() and not runtime.ready.is_set()
    assert not backend.forward_pool.is_alive() and not backend.backward_pool.is_alive()
    with pytest.raises(RuntimeError, match="shut down"):
        backend.forward_pool.submit_task(torch.ones(1, 2)).result(timeout=5)


def test_run_in_the_calling_thread_until_shutdown(runtime_factory):
    backend = ModuleBackend("expert.0", nn.Identity(), args_schema=(BatchTensorDescriptor(2),), max_batch_size=8)
    runtime = runtime_factory({"expert.0": backend})
    caller = threading.Thread(target=runtime.run)
    caller.start()
    assert runtime.ready.wait(10)
    (output,) = backend.forward_pool.submit_task(torch.ones(2, 2)).result(timeout=10)
    assert torch.equal(output, torch.ones(2, 2))
    runtime.shutdown()
    caller.join(10)
    assert not caller.is_alive()


def test_stats_report_lines():
    stats = _Stats()
    stats.record("expert.0_forward", 32, 0.5)
    stats.record("expert.0_forward", 16, 0.5)
    header, line, total = stats.report_and_reset()
    assert re.fullmatch(r"Processed 2 batches in last \d+\.\d\d seconds:", header)
    assert re.fullmatch(
        r"expert\.0_forward: 2 batches \(\d+\.\d\d batches/s\), 48 examples \(\d+\.\d\d examples/s\), "
        r"avg batch size 24\.00",
        line,
    )
    assert total.startswith("Runtime: computing") and "48.0 examples/s while computing" in total
    assert re.fullmatch(r"Processed 0 batches in last \d+\.\d\d seconds:", *stats.report_and_reset())


def test_stats_rates_below_one_per_second_are_given_as_seconds_each():
    assert _rate(1, 4.0, "batch") == "4.00 s/batch" and _rate(3, 2.0, "example") == "1.50 examples/s"


class TokenPerTaskPool(threading.Thread):
    """A pool that follows the Runtime protocol the way downstream pools do (one pipe message per task, no batching,
    priority as a tuple), to check that the Runtime needs nothing TaskPool-specific."""

    def __init__(self, process_func, name):
        super().__init__(name=name, daemon=True)
        self.process_func = process_func
        self.tasks, self.dispatched = queue.Queue(), {}
        self.batch_receiver, self.batch_sender = mp.Pipe(duplex=False)
        self.priority = (0.0, 0.0)
        self.stopped = threading.Event()

    def run(self):
        self.stopped.wait()

    def submit_task(self, *args):
        future = Future()
        self.tasks.put((future, args))
        self.batch_sender.send(None)
        return future

    def load_batch_to_runtime(self, timeout=None, device=None):
        future, args = self.tasks.get(timeout=timeout)
        self.batch_receiver.recv()
        self.dispatched[id(future)] = future
        return id(future), args

    def send_outputs_from_runtime(self, uid, outputs):
        self.dispatched.pop(uid).set_result(outputs)

    def send_exception_from_runtime(self, uid, exception):
        self.dispatched.pop(uid).set_exception(exception)

    def shutdown(self):
        self.stopped.set()


def test_runtime_serves_any_pool_that_follows_the_protocol(runtime_factory):
    pool = TokenPerTaskPool(lambda x: (x * 3,), name="custom")
    runtime = runtime_factory({"x": FakeBackend(pool)})
    runtime.start()
    assert runtime.ready.wait(10)
    (output,) = pool.submit_task(torch.ones(2)).result(timeout=10)
    assert torch.equal(output, torch.full((2,), 3.0))
    runtime.shutdown(timeout=10)
    pool.join(10)  # the runtime stopped it; its thread may take a moment to notice on a loaded machine
    assert not pool.is_alive()
