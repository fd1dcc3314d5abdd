"""The server-side setup of petals 2.2.0, run against this library: a ModuleBackend subclass (keyword-only arguments of
its own, super().forward / backward / get_info) whose pools are replaced by prioritized pools of its own (threads that
hand out one task at a time, MPFutures whose shared state is swapped for a private tensor), several backends sharing
one pool, a Runtime subclass that deduplicates ``self.pools``, run in the caller's thread with ``device=None``, tasks
submitted from forked handler processes, and petals' shutdown order (pools, then runtime, then backends)."""

import ctypes
import multiprocessing as mp
import threading
import time
from concurrent.futures._base import PENDING
from queue import PriorityQueue

import pytest
import torch

from hivemind.moe.server.module_backend import ModuleBackend
from hivemind.moe.server.runtime import Runtime
from hivemind.utils.mpfuture import ALL_STATES, MPFuture
from hivemind.utils.tensor_descr import BatchTensorDescriptor


class PrioritizedPool(threading.Thread):
    """A pool that follows the Runtime's protocol as petals' PrioritizedTaskPool does: no batching, (priority, time)
    order, results set from the Runtime's thread on futures created in other processes."""

    def __init__(self, process_func, max_batch_size: int, name: str):
        super().__init__(name=name, daemon=True)
        self.process_func, self.max_batch_size = process_func, max_batch_size
        self._priority = mp.Value(ctypes.c_double, 1.0)
        self._oldest_timestamp = mp.Value(ctypes.c_double, 1.0)
        self.submitted_tasks = mp.SimpleQueue()
        self._ordered_tasks, self._dispatched = PriorityQueue(), {}
        self.batch_receiver, self.batch_sender = mp.Pipe(duplex=False)
        self.priority = (float("inf"), float("inf"))

    def run(self):
        while True:
            task = self.submitted_tasks.get()
            if task is None:
                return
            self._ordered_tasks.put(task)

    def shutdown(self):
        self.submitted_tasks.put(None)

    def submit_task(self, *args, priority: float = 0.0) -> MPFuture:
        future = MPFuture()
        future._shared_state_code = torch.tensor([ALL_STATES.index(PENDING)], dtype=torch.uint8)  # as petals does
        task = (priority, time.monotonic(), future._uid, future, args)
        self.submitted_tasks.put(task)
        self.batch_sender.send(None)
        if task[:2] < self.priority:
            self.priority = task[:2]
        return future

    def load_batch_to_runtime(self, timeout=None, device=None):
        _priority, _time, uid, future, args = task = self._ordered_tasks.get(block=True, timeout=timeout)
        self._dispatched[uid] = task
        self.batch_receiver.recv()
        return uid, list(args)

    def send_outputs_from_runtime(self, uid, batch_outputs):
        self._dispatched.pop(uid)[3].set_result([output.share_memory_() for output in batch_outputs])

    def send_exception_from_runtime(self, uid, exception):
        self._dispatched.pop(uid)[3].set_exception(exception)

    @property
    def empty(self):
        return not self.batch_receiver.poll()

    @property
    def priority(self):
        return float(self._priority.value), float(self._oldest_timestamp.value)

    @priority.setter
    def priority(self, item):
        self._priority.value, self._oldest_timestamp.value = float(item[0]), float(item[1])


class AdapterBackend(ModuleBackend):
    """petals' TransformerBackend in small: the last input of a task names an adapter, stripped before super()"""

    def __init__(self, *args, scale: float, shared_pool=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.scale = scale
        max_batch_size = self.forward_pool.max_batch_size
        self.inference_pool = shared_pool or PrioritizedPool(self.inference_step, max_batch_size, f"{self.name}_inf")
        self.forward_pool = PrioritizedPool(self.forward, max_batch_size, f"{self.name}_forward")
        self.backward_pool = PrioritizedPool(self.backward, max_batch_size, f"{self.name}_backward")

    def forward(self, *inputs):
        *inputs, adapter = inputs
        assert adapter == "adapter"
        return super().forward(*inputs)

    def backward(self, *inputs):
        *inputs, adapter = inputs
        return super().backward(*inputs)

    @torch.inference_mode()
    def inference_step(self, hidden_states, step):
        return (self.module(hidden_states) * self.scale + step,)

    def get_pools(self):
        return self.forward_pool, self.backward_pool, self.inference_pool

    def get_info(self):
        return dict(super().get_info(), scale=self.scale)

    def shutdown(self):
        self.forward_pool = self.backward_pool = self.inference_pool = None


class RuntimeWithDeduplicatedPools(Runtime):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.pools = tuple(set(self.pools))


def _submit_from_a_handler_process(pool, args, results):
    try:
        (output,) = pool.submit_task(*args, priority=1.0).result(timeout=20)
        results.put(("ok", output.tolist()))  # (a tensor would be shared with a process that ends)
    except BaseException as e:
        results.put(("error", repr(e)))


@pytest.mark.timeout(60)
def test_a_petals_like_runtime_serves_its_own_pools_to_handler_processes():
    torch.manual_seed(0)
    module = torch.nn.Linear(4, 4)
    for parameter in module.parameters():
        parameter.requires_grad = False
    schema = dict(
        args_schema=(BatchTensorDescriptor(4),), kwargs_schema={}, outputs_schema=(BatchTensorDescriptor(4),)
    )
    first = AdapterBackend("block.0", module, scale=1.0, min_batch_size=1, max_batch_size=16, **schema)
    second = AdapterBackend(
        "block.1", module, scale=2.0, shared_pool=first.inference_pool, min_batch_size=1, max_batch_size=16, **schema
    )
    backends = {"block.0": first, "block.1": second}
    assert first.get_info()["scale"] == 1.0 and "forward_schema" in first.get_info()

    runtime = RuntimeWithDeduplicatedPools(backends, device=None, prefetch_batches=1, sender_threads=1)
    assert len(runtime.pools) == 5  # the shared inference pool once
    thread = threading.Thread(target=runtime.run, daemon=True)
    thread.start()
    try:
        assert runtime.ready.wait(10)
        x = torch.randn(3, 4)
        results = mp.Queue()
        jobs = [(first.forward_pool, (x, "adapter")), (second.inference_pool, (x, torch.tensor(5.0)))]
        processes = [
            mp.get_context("fork").Process(target=_submit_from_a_handler_process, args=(pool, args, results))
            for pool, args in jobs
        ]
        for process in processes:
            process.start()
        outputs = [results.get(timeout=30) for _ in processes]
        assert all(status == "ok" for status, _ in outputs), outputs
        outputs = sorted((torch.tensor(output) for _, output in outputs), key=lambda tensor: tensor.sum().item())
        for process in processes:
            process.join(10)
        expected = sorted([module(x), module(x) + 5.0], key=lambda tensor: tensor.sum().item())
        for output, want in zip(outputs, expected):
            assert torch.allclose(output, want, atol=1e-6)

        (grad_inputs,) = first.backward_pool.submit_task(x, torch.ones(3, 4), "adapter").result(timeout=10)
        assert torch.allclose(grad_inputs, torch.ones(3, 4) @ module.weight)
    finally:
        runtime.ready.clear()
        for pool in runtime.pools:
            if pool.is_alive():
                pool.shutdown()
        runtime.shutdown()
        thread.join(10)
        for backend in backends.values():
            backend.shutdown()
    assert not thread.is_alive()


@pytest.mark.timeout(60)
def test_a_declared_outputs_schema_with_placeholder_shapes_is_served_as_petals_declares_it():
    # petals: args_schema and outputs_schema BatchTensorDescriptor(1, 2048, hidden_size) for any sequence length
    torch.manual_seed(0)
    module = torch.nn.Linear(8, 8)
    placeholder = BatchTensorDescriptor(1, 2048, 8, dtype=torch.float32)
    backend = ModuleBackend(
        "block.0",
        module,
        args_schema=(placeholder,),
        kwargs_schema={},
        outputs_schema=(placeholder,),
        max_batch_size=64,
    )
    hidden_states = torch.randn(1, 5, 8)
    (output,) = backend.forward(hidden_states)
    assert torch.allclose(output, module(hidden_states).detach())
    (grad_inputs,) = backend.backward(hidden_states, torch.ones(1, 5, 8))
    assert grad_inputs.shape == (1, 5, 8)

    runtime = Runtime({"block.0": backend}, device=None)
    runtime.start()
    try:
        assert runtime.ready.wait(10)
        (output,) = backend.forward_pool.submit_task(torch.randn(2, 3, 8)).result(timeout=10)
        assert output.shape == (2, 3, 8)
    finally:
        runtime.shutdown(timeout=10)
