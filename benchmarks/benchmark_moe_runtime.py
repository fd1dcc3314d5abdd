"""Where the time of an expert server goes, without the network: ModuleBackend + TaskPool + Runtime.

    python benchmarks/benchmark_moe_runtime.py [--experts 4] [--clients 4] [--batch-size 256] [--hidden-dim 1024]
                                              [--steps 5] [--expert-cls ffn] [--device cpu]

Prints, in one run:
- local: the experts' forward + backward called directly, one batch at a time (the compute bound);
- pools, threads: clients in threads of the server process submit tasks (how a handler in the server process
  reaches the pools), so tasks of several clients are batched together;
- pools, fork: the same clients as forked processes (tensors cross a local socket, one copy each way);
- the fixed cost of one task (a round trip of a 1-row task through a pool and the Runtime, in-process and from a
  forked process) and of moving 1 MiB each way between processes.
"""

import argparse
import multiprocessing as mp
import threading
import time

import torch

from hivemind.moe.server.layers import name_to_block, name_to_input
from hivemind.moe.server.module_backend import ModuleBackend
from hivemind.moe.server.runtime import Runtime
from hivemind.moe.server.task_pool import TaskPool
from hivemind.utils.tensor_descr import BatchTensorDescriptor


def make_backends(args):
    backends = {}
    for index in range(args.experts):
        uid = f"expert.{index}"
        module = name_to_block[args.expert_cls](args.hidden_dim).to(args.device)
        sample = name_to_input[args.expert_cls](args.batch_size, args.hidden_dim)
        sample = sample if isinstance(sample, tuple) else (sample,)
        schema = tuple(BatchTensorDescriptor.from_tensor(tensor) for tensor in sample)
        optimizer = torch.optim.Adam(module.parameters())
        backends[uid] = ModuleBackend(uid, module, optimizer=optimizer, args_schema=schema, max_batch_size=1 << 16)
    return backends


def sample_inputs(args):
    sample = name_to_input[args.expert_cls](args.batch_size, args.hidden_dim)
    sample = sample if isinstance(sample, tuple) else (sample,)
    return tuple(torch.randn_like(t) if t.is_floating_point() else t for t in sample)


def client_steps(backends, inputs, steps):
    for _ in range(steps):
        for backend in backends.values():
            outputs = backend.forward_pool.submit_task(*inputs).result()
            grads = tuple(torch.randn_like(output) for output in outputs)
            backend.backward_pool.submit_task(*inputs, *grads).result()


def _forked_client(backends, inputs, steps, report):
    client_steps(backends, inputs, steps)
    report.put("done")


def measure_local(backends, inputs, args) -> float:
    start = time.perf_counter()
    for _ in range(args.steps):
        for backend in backends.values():
            device_inputs = [tensor.to(args.device) for tensor in inputs]
            outputs = backend.forward(*device_inputs)
            backend.backward(*device_inputs, *(torch.randn_like(output) for output in outputs))
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    return args.steps * args.experts * args.batch_size / (time.perf_counter() - start)


def measure_threads(backends, inputs, args) -> float:
    threads = [threading.Thread(target=client_steps, args=(backends, inputs, args.steps)) for _ in range(args.clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return args.clients * args.steps * args.experts * args.batch_size / (time.perf_counter() - start)


def measure_fork(backends, inputs, args) -> float:
    context = mp.get_context("fork")
    report = context.Queue()
    processes = [
        context.Process(target=_forked_client, args=(backends, inputs, args.steps, report))
        for _ in range(args.clients)
    ]
    start = time.perf_counter()
    for process in processes:
        process.start()
    for _ in processes:
        report.get(timeout=600)
    elapsed = time.perf_counter() - start
    for process in processes:
        process.join()
    return args.clients * args.steps * args.experts * args.batch_size / elapsed


class _PoolOnly:
    def __init__(self, pool):
        self.pool = pool

    def get_pools(self):
        return (self.pool,)


def _round_trips(pool, tensor, repeats, report):
    pool.submit_task(tensor).result()  # connect / warm up
    start = time.perf_counter()
    for _ in range(repeats):
        pool.submit_task(tensor).result()
    report.put((time.perf_counter() - start) / repeats)


def measure_overheads(repeats: int):
    pool = TaskPool(lambda x: x, max_batch_size=1 << 20, name="echo")
    runtime = Runtime({"echo": _PoolOnly(pool)})
    runtime.start()
    runtime.ready.wait()
    context = mp.get_context("fork")
    results = {}
    try:
        for label, tensor in (("1-row task", torch.ones(1, 4)), ("1 MiB task", torch.ones(256, 1024))):
            report = context.Queue()
            _round_trips(pool, tensor, repeats, report)
            results[f"{label}, in-process"] = report.get()
            process = context.Process(target=_round_trips, args=(pool, tensor, repeats, report))
            process.start()
            results[f"{label}, forked process"] = report.get(timeout=600)
            process.join()
    finally:
        runtime.shutdown()
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--hidden-dim", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=5, help="forward + backward calls per client and expert")
    parser.add_argument("--expert-cls", default="ffn")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=300, help="round trips for the fixed-cost figures")
    args = parser.parse_args()

    print(
        f"experts={args.experts} clients={args.clients} batch={args.batch_size} hidden={args.hidden_dim} "
        f"expert_cls={args.expert_cls} steps={args.steps} device={args.device} torch_threads={torch.get_num_threads()}"
    )
    backends = make_backends(args)
    inputs = sample_inputs(args)
    local = measure_local(backends, inputs, args)
    runtime = Runtime(backends, device=torch.device(args.device))
    runtime.start()
    runtime.ready.wait()
    try:
        threads = measure_threads(backends, inputs, args)
        forked = measure_fork(backends, inputs, args)
    finally:
        runtime.shutdown()
    print(f"{'mode':<36}{'samples/s (forward + backward)':>32}")
    for label, value in (
        ("local, direct calls", local),
        ("pools, client threads", threads),
        ("pools, forked clients", forked),
    ):
        print(f"{label:<36}{value:>32.0f}")
    print(f"{'fixed cost of one task':<36}{'round trip, us':>32}")
    for label, seconds in measure_overheads(args.repeats).items():
        print(f"{label:<36}{seconds * 1e6:>32.0f}")


if __name__ == "__main__":
    main()
