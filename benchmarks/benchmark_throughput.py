"""Throughput of an expert server: client processes send forward + backward batches to ffn experts over p2p.

    python benchmarks/benchmark_throughput.py [--num_experts 4] [--num_clients 4] [--batch_size 256]
        [--hid_dim 1024] [--steps 20] [--expert_cls ffn] [--num_handlers N] [--forward_only]
    python benchmarks/compare.py benchmarks/benchmark_throughput.py --hid_dim 256 --batch_size 64   # vs original
    python benchmarks/benchmark_throughput.py --duration 180 --rss_every 15   # memory under constant load

Only the public API is used (``Server.create``, ``get_experts``, ``RemoteExpert``), so the same script runs under
the original hivemind. The server runs in this process (as ``hivemind-server`` would); every client is a separate
process with its own client-mode DHT node. Each client step sends one batch to one expert (round robin, clients
shifted so that every expert is busy) and calls backward with a fixed output gradient, which also makes the
server's optimizer step. Printed, in one table:

- server start-up: seconds of ``Server.create(..., start=True)`` until it serves;
- throughput: samples per second over all clients (a sample counts once for its forward and backward);
- local bound: the same expert modules run in this process without network or batching (forward without
  gradients, then forward with gradients, backward and the step of the optimizer that ``Server.create`` builds by
  default: the work the server does per batch), the fastest of ``--local_steps`` rounds, before and after the
  clients ran (the best of both), with the milliseconds of each phase;
- ratio: throughput / local bound;
- CPU seconds per batch (one client step: forward + backward) of the server process, its DHT process and p2p
  daemon, the clients and theirs, and the server's page faults per batch (fresh memory costs a fault per 4 KiB).

``--profile`` samples the stacks of this process's threads (the server's Runtime, handlers and pools) every few
milliseconds while the clients run, and prints where they spent their time. ``--stats`` logs the Runtime's own
statistics lines. ``--duration S`` runs the clients for S seconds instead of ``--steps`` and, with ``--rss_every``,
prints the resident memory of the server (this process and its children: DHT process, p2p daemon) periodically.
"""

import argparse
import collections
import multiprocessing as mp
import os
import resource
import sys
import threading
import time
import traceback

import torch

from hivemind.dht import DHT
from hivemind.moe.server import Server
from hivemind.moe.server.dht_handler import get_experts
from hivemind.moe.server.layers import name_to_block, name_to_input

START_TIMEOUT = 300  # seconds for every client to find the experts and warm up


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_experts", type=int, default=4)
    parser.add_argument("--num_clients", type=int, default=4)
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--hid_dim", type=int, default=1024)
    parser.add_argument("--expert_cls", default="ffn")
    parser.add_argument("--steps", type=int, default=20, help="timed batches per client")
    parser.add_argument("--warmup_steps", type=int, default=2, help="untimed batches per client first")
    parser.add_argument("--num_handlers", type=int, default=None, help="Server.create(num_handlers=...)")
    parser.add_argument("--max_batch_size", type=int, default=4096)
    parser.add_argument("--forward_only", action="store_true", help="clients send forward calls only")
    parser.add_argument(
        "--torch_threads", type=int, default=None, help="torch threads of the server (default: torch's choice)"
    )
    parser.add_argument("--local_steps", type=int, default=10, help="batches per expert for the local bound")
    parser.add_argument("--stats", type=float, default=None, help="Runtime stats_report_interval (seconds)")
    parser.add_argument("--profile", action="store_true", help="sample this process's thread stacks")
    parser.add_argument("--duration", type=float, default=None, help="run the clients this long instead")
    parser.add_argument("--rss_every", type=float, default=None, help="with --duration: print RSS this often")
    return parser.parse_args()


def make_inputs(args):
    sample = name_to_input[args.expert_cls](args.batch_size, args.hid_dim)
    sample = sample if isinstance(sample, tuple) else (sample,)
    return tuple(torch.randn_like(t) if t.is_floating_point() else t for t in sample)


# ----------------------------------------------------------------------------------------------- clients


def client_main(index, args, setup_queue, ready_queue, start_event, stop_event, result_queue):
    """One client process: join the DHT, find the experts, warm up, then run timed steps when told."""
    try:
        torch.set_num_threads(1)
        initial_peers, uids = setup_queue.get()
        dht = DHT(initial_peers=initial_peers, client_mode=True, start=True)
        experts = []
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            experts = get_experts(dht, uids)
            if all(expert is not None for expert in experts) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        if any(expert is None for expert in experts):
            raise RuntimeError(f"client {index}: experts not found in the DHT")
        inputs = make_inputs(args)
        floating = [tensor.is_floating_point() for tensor in inputs]
        grad_output = None

        def step(number):
            nonlocal grad_output
            expert = experts[(index + number) % len(experts)]
            call_inputs = [t.clone().requires_grad_(f) if f else t for t, f in zip(inputs, floating)]
            with torch.set_grad_enabled(not args.forward_only):
                output = expert(*call_inputs)
            if args.forward_only:
                return
            if grad_output is None:
                grad_output = torch.randn_like(output)
            output.backward(grad_output)

        for number in range(args.warmup_steps):
            step(number)
        ready_queue.put((index, None))
        start_event.wait()
        started, done, cpu_started = time.perf_counter(), 0, tree_cpu_seconds(os.getpid())
        while (args.duration is None and done < args.steps) or (args.duration is not None and not stop_event.is_set()):
            step(args.warmup_steps + done)
            done += 1
        cpu = {key: value - cpu_started.get(key, 0.0) for key, value in tree_cpu_seconds(os.getpid()).items()}
        result_queue.put((index, done * args.batch_size, time.perf_counter() - started, None, cpu))
        dht.shutdown()
    except BaseException as e:
        error = f"{e!r}\n{traceback.format_exc()}"
        ready_queue.put((index, error))
        result_queue.put((index, 0, 0.0, error, {}))


# ----------------------------------------------------------------------------------------------- local bound


def server_optimizer_class():
    """The optimizer Server.create builds by default: ours picks torch's fastest Adam, the original plain Adam."""
    try:
        from hivemind.moe.server.fast_adam import FastAdam

        return FastAdam
    except ImportError:
        return torch.optim.Adam


def measure_local_bound(args):
    """Samples/s of the server's work per batch done directly in this process, one expert at a time, with the
    optimizer the server builds; also the milliseconds per batch of each phase in the fastest round."""
    torch.manual_seed(0)
    modules = [name_to_block[args.expert_cls](args.hid_dim) for _ in range(args.num_experts)]
    optimizers = [server_optimizer_class()(module.parameters()) for module in modules]
    inputs = make_inputs(args)
    floating = [tensor.is_floating_point() for tensor in inputs]

    def step(module, optimizer, phases):
        started = time.perf_counter()
        with torch.no_grad():
            outputs = module(*inputs)
        phases["forward"] += time.perf_counter() - started
        if args.forward_only:
            return
        started = time.perf_counter()
        leaves = [t.detach().requires_grad_(f) for t, f in zip(inputs, floating)]
        outputs = module(*leaves)
        outputs.backward(torch.ones_like(outputs))
        phases["forward+backward"] += time.perf_counter() - started
        started = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad()
        phases["optimizer step"] += time.perf_counter() - started

    for module, optimizer in zip(modules, optimizers):
        step(module, optimizer, collections.Counter())  # warm-up
    rounds = []  # one round: a batch through every expert; the fastest round resists a busy machine
    for _ in range(args.local_steps):
        phases = collections.Counter()
        for module, optimizer in zip(modules, optimizers):
            step(module, optimizer, phases)
        rounds.append((sum(phases.values()), phases))
    seconds, phases = min(rounds, key=lambda item: item[0])
    phases_ms = {name: 1000 * value / args.num_experts for name, value in phases.items()}
    return args.num_experts * args.batch_size / seconds, phases_ms


def measure_serialization(args, repeats: int = 20):
    """Milliseconds to serialize and to deserialize one batch of inputs (what each request and answer costs)."""
    from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor

    inputs = make_inputs(args)
    serialize_times, deserialize_times = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        messages = [serialize_torch_tensor(tensor) for tensor in inputs]
        serialize_times.append(time.perf_counter() - started)
        started = time.perf_counter()
        for message in messages:
            deserialize_torch_tensor(message)
        deserialize_times.append(time.perf_counter() - started)
    return 1000 * min(serialize_times), 1000 * min(deserialize_times)


# ----------------------------------------------------------------------------------------------- diagnostics


class StackSampler(threading.Thread):
    """Samples the innermost frames of every other thread of this process; a poor man's py-spy."""

    def __init__(self, interval: float = 0.005):
        super().__init__(daemon=True, name="StackSampler")
        self.interval, self.samples, self.stop = interval, collections.Counter(), threading.Event()
        self.per_thread = collections.Counter()

    def run(self):
        me = threading.get_ident()
        while not self.stop.wait(self.interval):
            names = {thread.ident: thread.name for thread in threading.enumerate()}
            for ident, frame in sys._current_frames().items():
                if ident == me:
                    continue
                name = names.get(ident, "?").split("_")[0].split("-")[0]
                stack = traceback.extract_stack(frame)[-3:]
                where = " < ".join(f"{os.path.basename(f.filename)}:{f.name}" for f in reversed(stack))
                self.samples[(name, where)] += 1
                self.per_thread[name] += 1

    def report(self, top: int = 20):
        """Per thread: the share of samples in which it was not waiting; then the most frequent busy stacks."""
        busy = collections.Counter()
        for (name, where), count in self.samples.items():
            if where.split(" < ")[0].split(":")[-1] not in IDLE_FUNCTIONS:
                busy[(name, where)] += count
        print("\nserver process threads, share of samples not waiting:")
        for name, total in self.per_thread.most_common():
            share = sum(count for (thread, _), count in busy.items() if thread == name) / total
            if share >= 0.005:
                print(f"  {share:6.1%}  {name}")
        print("busy stacks (innermost first), share of that thread's samples:")
        for (name, where), count in busy.most_common(top):
            print(f"  {count / self.per_thread[name]:6.1%}  {name:<20} {where}")


# leaf functions of a thread that waits (a thread inside the uvloop event loop shows as busy: its C code is opaque)
IDLE_FUNCTIONS = {"wait", "select", "accept", "_recv", "_worker", "_poll", "recv", "get", "poll", "sleep"}


def server_memory(client_pids) -> str:
    """Resident memory of this process (the server) and of its children other than clients (DHT, p2p daemon)."""
    import psutil

    me = psutil.Process()
    own, others, excluded = me.memory_info().rss, 0, set(client_pids)
    for pid in client_pids:  # a client's own DHT process and daemon are not the server's
        try:
            excluded.update(child.pid for child in psutil.Process(pid).children(recursive=True))
        except psutil.Error:
            pass
    for child in me.children(recursive=True):
        if child.pid in excluded:
            continue
        try:
            others += child.memory_info().rss
        except psutil.Error:
            pass
    return f"server {own / 2**20:.0f} MiB, its DHT and p2p daemon {others / 2**20:.0f} MiB"


def tree_cpu_seconds(pid: int, exclude=()) -> dict:
    """CPU seconds (user + system) used so far by a process ("self", all its threads), by its children other than
    ``exclude`` and their descendants ("children": DHT process, p2p daemon), and its page faults ("minor faults")."""
    import psutil

    def cpu(process):
        times = process.cpu_times()
        return times.user + times.system

    try:
        process = psutil.Process(pid)
        result = {"self": cpu(process), "children": 0.0}
        excluded = set(exclude)
        for child_pid in exclude:
            try:
                excluded.update(child.pid for child in psutil.Process(child_pid).children(recursive=True))
            except psutil.Error:
                pass
        for child in process.children(recursive=True):
            if child.pid not in excluded:
                try:
                    result["children"] += cpu(child)
                except psutil.Error:
                    pass
        if pid == os.getpid():
            result["minor faults"] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            names = {thread.native_id: thread.name for thread in threading.enumerate()}
            for thread in process.threads():  # threads torch or the p2p bindings start have no Python name
                name = names.get(thread.id, "other threads").split("_")[0].split("-")[0]
                key = f"thread {name}"
                result[key] = result.get(key, 0.0) + thread.user_time + thread.system_time
                try:  # Linux: the thread's own minor page faults, field 10 of its stat line
                    with open(f"/proc/self/task/{thread.id}/stat") as f:
                        faults = int(f.read().rsplit(")", 1)[1].split()[7])
                    result[f"faults {name}"] = result.get(f"faults {name}", 0) + faults
                except (OSError, ValueError, IndexError):
                    pass
        return result
    except psutil.Error:
        return {}


# ----------------------------------------------------------------------------------------------- main


def main():
    args = parse_args()
    context = mp.get_context("fork")  # clients are forked before this process runs any torch op or thread
    setup_queue, ready_queue, result_queue = context.Queue(), context.Queue(), context.Queue()
    start_event, stop_event = context.Event(), context.Event()
    clients = [
        context.Process(
            target=client_main,
            args=(index, args, setup_queue, ready_queue, start_event, stop_event, result_queue),
            daemon=False,  # each client starts its own DHT process
        )
        for index in range(args.num_clients)
    ]
    for client in clients:
        client.start()
    client_pids = {client.pid for client in clients}

    if args.torch_threads is not None:  # on a busy machine, one thread avoids OpenMP threads waiting for each other
        torch.set_num_threads(args.torch_threads)
    local_bound, local_phases = measure_local_bound(args)
    serialize_ms, deserialize_ms = measure_serialization(args)

    uids = [f"expert.{index}" for index in range(args.num_experts)]
    started = time.perf_counter()
    server = Server.create(
        expert_uids=uids,
        expert_cls=args.expert_cls,
        hidden_dim=args.hid_dim,
        num_handlers=args.num_handlers,
        max_batch_size=args.max_batch_size,
        stats_report_interval=args.stats,
        host_maddrs=["/ip4/127.0.0.1/tcp/0"],
        start=True,
    )
    startup_seconds = time.perf_counter() - started
    try:
        initial_peers = [str(maddr) for maddr in server.dht.get_visible_maddrs()]
        for _ in clients:
            setup_queue.put((initial_peers, uids))
        for _ in clients:
            index, error = ready_queue.get(timeout=START_TIMEOUT)
            if error is not None:
                raise RuntimeError(f"client {index} failed to start:\n{error}")

        sampler = StackSampler() if args.profile else None
        if sampler is not None:
            sampler.start()
        rss_start = server_memory(client_pids)
        server_cpu_started = tree_cpu_seconds(os.getpid(), exclude=client_pids)
        start_event.set()
        started = time.perf_counter()
        if args.duration is not None:
            next_report = started
            while time.perf_counter() - started < args.duration:
                if args.rss_every is not None and time.perf_counter() >= next_report:
                    elapsed = time.perf_counter() - started
                    print(f"rss at {elapsed:6.0f} s  {server_memory(client_pids)}", flush=True)
                    next_report += args.rss_every
                time.sleep(0.5)
            stop_event.set()
        results = [result_queue.get(timeout=START_TIMEOUT + (args.duration or 0)) for _ in clients]
        elapsed = time.perf_counter() - started
        server_cpu = tree_cpu_seconds(os.getpid(), exclude=client_pids)
        server_cpu = {key: value - server_cpu_started.get(key, 0.0) for key, value in server_cpu.items()}
        if sampler is not None:
            sampler.stop.set()
        errors = [error for _, _, _, error, _ in results if error is not None]
        if errors:
            raise RuntimeError(f"{len(errors)} clients failed, e.g.:\n{errors[0]}")
        samples = sum(count for _, count, _, _, _ in results)
        clients_cpu = {key: sum(cpu.get(key, 0.0) for *_, cpu in results) for key in ("self", "children")}
        throughput = samples / elapsed
        rss_end = server_memory(client_pids)
        local_bound_after, phases_after = measure_local_bound(args)  # measured again, the best of both is kept
        if local_bound_after > local_bound:
            local_bound, local_phases = local_bound_after, phases_after
    finally:
        server.shutdown()
        stop_event.set()
        for client in clients:
            client.join(10)
            if client.is_alive():
                client.terminate()

    passes = "forward" if args.forward_only else "forward+backward"
    print(f"\n{args.expert_cls} experts on {torch.get_num_threads()} torch threads, {os.cpu_count()} cpus")
    print("| experts | clients | batch | hidden dim | passes | samples/s | start-up, s | local bound | ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(
        f"| {args.num_experts} | {args.num_clients} | {args.batch_size} | {args.hid_dim} | {passes} | "
        f"{throughput:.1f} | {startup_seconds:.2f} | {local_bound:.1f} | {throughput / local_bound:.3f} |"
    )
    print(f"one batch of inputs  serialize {serialize_ms:.3f} ms, deserialize {deserialize_ms:.3f} ms")
    compute_ms = 1000 * args.batch_size / local_bound
    print(f"one batch locally  {compute_ms:.2f} ms (forward, then forward+backward+step)")
    phases = ", ".join(f"{name} {value:.1f}" for name, value in local_phases.items())
    print(f"  of which, ms: {phases} ({server_optimizer_class().__name__})")
    batches = samples / args.batch_size
    print(
        f"cpu during the load ({elapsed:.1f} s wall, {batches:.0f} batches): server process "
        f"{server_cpu.get('self', 0):.1f} s, its DHT and p2p daemon {server_cpu.get('children', 0):.1f} s, clients "
        f"{clients_cpu['self']:.1f} s, their DHT processes and p2p daemons {clients_cpu['children']:.1f} s"
    )
    per_batch = {
        "server": server_cpu.get("self", 0), "server's DHT+p2pd": server_cpu.get("children", 0),
        "clients": clients_cpu["self"], "clients' DHT+p2pd": clients_cpu["children"],
    }  # fmt: skip
    print(
        "cpu per batch, ms:  " + ", ".join(f"{key} {1000 * value / batches:.1f}" for key, value in per_batch.items())
    )
    threads = sorted(
        ((key[7:], value) for key, value in server_cpu.items() if key.startswith("thread ")), key=lambda x: -x[1]
    )
    print(
        "server process cpu per batch by thread, ms:  "
        + ", ".join(f"{n} {1000 * v / batches:.1f}" for n, v in threads)
    )
    faults = sorted(
        ((key[7:], value) for key, value in server_cpu.items() if key.startswith("faults ")), key=lambda x: -x[1]
    )
    by_thread = ", ".join(f"{name} {value / batches:.0f}" for name, value in faults if value >= batches)
    print(f"server page faults per batch  {server_cpu.get('minor faults', 0) / batches:.0f} ({by_thread})")
    print(f"rss before the load  {rss_start}")
    print(f"rss after {elapsed:.0f} s  {rss_end}")
    if sampler is not None:
        sampler.report()


if __name__ == "__main__":
    main()
