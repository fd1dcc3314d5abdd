"""All-reduce throughput: hivemind's butterfly all-reduce against torch.distributed (gloo), peers on 127.0.0.1.

Every peer is a separate process (as with torch.distributed). Each round averages one float32 vector of the given
size; the figure is the vector's size divided by the slowest peer's time for the round (MB = 10**6 bytes), the median
over the repeats. Our peers use AllReduceRunner directly (each with its own p2pd and a small servicer that routes the
calls, as an averager does) and add the deltas to their tensors, so both sides end with the averaged vector.

    python benchmarks/benchmark_allreduce.py --peers 2 4 --sizes 1M 16M 64M --repeats 5

With `--only gloo --averager` the script uses only the public API, so `benchmarks/compare.py` can run it against the
original library in the same run (our AllReduceRunner's constructor is not the original's).

The CPU columns are the CPU time (user + system) of all peer processes and of their p2pd daemons per MiB of the
averaged vector, summed over peers; "(x Python)" is the part of it spent in the peers' own processes (the rest is
their p2pd daemons).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import multiprocessing as mp
import os
import socket
import statistics
import sys
import time
from typing import AsyncIterator, Dict, List, Tuple

from hivemind.averaging.allreduce import AllReduceRunner
from hivemind.p2p import P2P, P2PContext, PeerID, ServicerBase
from hivemind.proto import averaging_pb2
from hivemind.utils.asyncio import achain, anext, as_aiter

try:  # absent from the original library: `compare.py` runs only `--only gloo --averager` against it
    from hivemind.utils.asyncio import await_with_timeout
except ImportError:  # pragma: no cover
    await_with_timeout = None

try:  # parts parsed without copying their tensors (absent from older trees that this file may be run against)
    from hivemind.averaging.part_encoding import ReceivedAveragingData
except ImportError:  # pragma: no cover
    ReceivedAveragingData = averaging_pb2.AveragingData
try:  # output memory reused across rounds, as the averager does (absent from older trees)
    from hivemind.averaging.output_buffers import ReusableOutputs
except ImportError:  # pragma: no cover
    ReusableOutputs = None

MiB = 1024**2
PREFIX = "bench_allreduce"
DEFAULT_PART_SIZE = 2**19  # the library's default part_size_bytes (512 KiB)


def parse_size(text: str) -> int:
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    return int(text[:-1]) * units[text[-1].upper()] if text[-1].upper() in units else int(text)


def _cpu_seconds(processes) -> float:
    total = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
            total += times.user + times.system
        except Exception:
            pass
    return total


# ---------------------------------------------------------------------------------------------- hivemind peers


class BenchmarkAverager(ServicerBase):
    """Routes rpc_aggregate_part calls to the runner of their group (what DecentralizedAverager does)."""

    def __init__(self):
        self.runners: Dict[bytes, AllReduceRunner] = {}
        self.changed = asyncio.Event()

    def register(self, runner: AllReduceRunner) -> None:
        self.runners[runner.group_id] = runner
        self.changed.set()
        self.changed = asyncio.Event()

    async def rpc_aggregate_part(
        self, parts: AsyncIterator[ReceivedAveragingData], context: P2PContext
    ) -> AsyncIterator[averaging_pb2.AveragingData]:
        first = await anext(parts)
        while first.group_id not in self.runners:
            await await_with_timeout(self.changed.wait(), 60)
        runner = self.runners[first.group_id]
        async for message in runner.rpc_aggregate_part(achain(as_aiter(first), parts), context):
            yield message


def hivemind_peer(rank: int, initial_maddrs: List[str], connection, torch_threads: int, part_size: int) -> None:
    import psutil
    import torch

    from hivemind.utils.malloc_tuning import tune_malloc_for_large_messages

    tune_malloc_for_large_messages()
    if torch_threads:
        torch.set_num_threads(torch_threads)
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    asyncio.run(_hivemind_peer_main(rank, initial_maddrs, connection, psutil, torch, part_size))


async def _hivemind_peer_main(rank, initial_maddrs, connection, psutil, torch, part_size) -> None:
    p2p = await P2P.create(initial_peers=initial_maddrs or None)
    servicer = BenchmarkAverager()
    await servicer.add_p2p_handlers(p2p, namespace=PREFIX)
    loop = asyncio.get_running_loop()
    connection.send((p2p.peer_id.to_bytes(), [str(maddr) for maddr in await p2p.get_visible_maddrs()]))
    peer_ids = [PeerID(raw) for raw in await loop.run_in_executor(None, connection.recv)]
    processes = [psutil.Process()] + psutil.Process().children(recursive=True)
    tensors: Dict[int, torch.Tensor] = {}
    reuse = {} if ReusableOutputs is None else dict(output_buffers=ReusableOutputs())
    while True:
        command = await loop.run_in_executor(None, connection.recv)
        if command is None:
            break
        size, round_id = command
        if size not in tensors:
            tensors.clear()
            tensors[size] = torch.randn(size, generator=torch.Generator().manual_seed(rank))
        tensor = tensors[size]
        group_id = hashlib.sha1(f"{size}/{round_id}".encode()).digest()
        cpu_before, own_before = _cpu_seconds(processes), _cpu_seconds(processes[:1])
        started = time.perf_counter()
        runner = AllReduceRunner(
            p2p=p2p,
            servicer_type=BenchmarkAverager,
            prefix=PREFIX,
            group_id=group_id,
            tensors=[tensor],
            ordered_peer_ids=peer_ids,
            peer_fractions=[1.0] * len(peer_ids),
            sender_timeout=30,
            reducer_timeout=60,
            part_size_bytes=part_size,
            **reuse,
        )
        servicer.register(runner)
        async for delta in runner:
            tensor.add_(delta)
        del delta  # the next round may reuse its memory (see output_buffers)
        elapsed = time.perf_counter() - started
        cpu, own = _cpu_seconds(processes) - cpu_before, _cpu_seconds(processes[:1]) - own_before
        servicer.runners.pop(group_id, None)
        connection.send((elapsed, cpu, float(tensor[:1000].sum()), own))
    await p2p.shutdown()


# ---------------------------------------------------------------------------------------------- averager peers


def averager_peer(rank: int, initial_maddrs: List[str], connection, torch_threads: int, part_size: int) -> None:
    """A peer that uses the public API: DHT + DecentralizedAverager; the time is from allow_allreduce() (the group
    is already formed) until the step's result, so matchmaking is not counted."""
    import psutil
    import torch

    from hivemind import DHT
    from hivemind.averaging import DecentralizedAverager
    from hivemind.averaging.control import AveragingStage

    if torch_threads:
        torch.set_num_threads(torch_threads)
    mp.set_start_method("fork", force=True)  # the original's averager cannot start under spawn; same for both
    dht = DHT(initial_peers=initial_maddrs or None, start=True)
    connection.send((dht.peer_id.to_bytes(), [str(maddr) for maddr in dht.get_visible_maddrs()]))
    num_peers = len(connection.recv())
    averager, tensor_size = None, None
    processes = [psutil.Process()]
    while True:
        command = connection.recv()
        if command is None:
            break
        size, round_id = command
        if size != tensor_size:
            if averager is not None:
                averager.shutdown()
            tensor = torch.randn(size, generator=torch.Generator().manual_seed(rank))
            averager = DecentralizedAverager(
                [tensor], dht, prefix=f"bench{size}", start=True, target_group_size=num_peers,
                min_matchmaking_time=1.0, request_timeout=0.5, next_chunk_timeout=30.0, allreduce_timeout=120.0,
                part_size_bytes=part_size,
            )  # fmt: skip
            tensor_size = size
            processes = [psutil.Process()] + psutil.Process().children(recursive=True)
        control = averager.step(wait=False, require_trigger=True, timeout=60)
        while control.stage != AveragingStage.AWAITING_TRIGGER and not control.done():
            time.sleep(0.01)
        connection.send("ready")
        assert connection.recv() == "go"
        cpu_before = _cpu_seconds(processes)
        started = time.perf_counter()
        control.allow_allreduce()
        try:
            control.result()
        except Exception as e:  # e.g. the group formed without some peer: report it instead of dying
            connection.send(("failed", repr(e)))
            continue
        elapsed = time.perf_counter() - started
        cpu = _cpu_seconds(processes) - cpu_before
        with averager.get_tensors() as (averaged,):
            checksum = float(averaged[:1000].sum())
        connection.send((elapsed, cpu, checksum))
    if averager is not None:
        averager.shutdown()
    dht.shutdown()


# ---------------------------------------------------------------------------------------------- gloo peers


def gloo_peer(rank: int, world_size: int, port: int, connection, torch_threads: int) -> None:
    import psutil
    import torch
    import torch.distributed as dist

    if torch_threads:
        torch.set_num_threads(torch_threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    process = psutil.Process()
    connection.send("ready")
    tensors: Dict[int, torch.Tensor] = {}
    while True:
        command = connection.recv()
        if command is None:
            break
        size, _ = command
        if size not in tensors:
            tensors.clear()
            tensors[size] = torch.randn(size, generator=torch.Generator().manual_seed(rank))
        tensor = tensors[size]
        dist.barrier()
        cpu_before = _cpu_seconds([process])
        started = time.perf_counter()
        dist.all_reduce(tensor)
        tensor.div_(world_size)
        elapsed = time.perf_counter() - started
        connection.send((elapsed, _cpu_seconds([process]) - cpu_before, float(tensor[:1000].sum())))
    dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------- driver


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_peers(kind: str, num_peers: int, torch_threads: int, part_size: int) -> Tuple[list, list]:
    context = mp.get_context("spawn")
    processes, connections = [], []
    if kind in ("hivemind", "averager"):
        target = hivemind_peer if kind == "hivemind" else averager_peer
        maddrs: List[str] = []
        peer_ids = []
        for rank in range(num_peers):
            parent_end, child_end = context.Pipe()
            process = context.Process(
                target=target,
                args=(rank, list(maddrs), child_end, torch_threads, part_size),
                daemon=kind == "hivemind",
            )
            process.start()
            peer_id, peer_maddrs = parent_end.recv()
            peer_ids.append(peer_id)
            maddrs.extend(peer_maddrs)
            processes.append(process)
            connections.append(parent_end)
        for connection in connections:
            connection.send(peer_ids)
    else:
        port = _free_port()
        for rank in range(num_peers):
            parent_end, child_end = context.Pipe()
            process = context.Process(
                target=gloo_peer, args=(rank, num_peers, port, child_end, torch_threads), daemon=True
            )
            process.start()
            processes.append(process)
            connections.append(parent_end)
        for connection in connections:
            assert connection.recv() == "ready"
    return processes, connections


def measure(
    kind: str,
    num_peers: int,
    sizes: List[int],
    repeats: int,
    torch_threads: int,
    stat=statistics.median,
    part_size: int = DEFAULT_PART_SIZE,
) -> Dict[int, dict]:
    processes, connections = start_peers(kind, num_peers, torch_threads, part_size)
    results = {}
    try:
        for size in sizes:
            times, cpus, python_cpus = [], [], []
            for round_id in range(repeats + 1):  # the first round warms up (connections, allocations)
                for connection in connections:
                    connection.send((size, round_id))
                if kind == "averager":  # every peer found the group: start the all-reduce everywhere at once
                    assert all(connection.recv() == "ready" for connection in connections)
                    for connection in connections:
                        connection.send("go")
                replies = [connection.recv() for connection in connections]
                failures = [reply[1] for reply in replies if reply[0] == "failed"]
                if failures:
                    print(f"{kind}, {num_peers} peers, {size} elements: round {round_id} failed: {failures[0]}")
                    continue
                if round_id == 0:
                    continue
                times.append(max(reply[0] for reply in replies))
                cpus.append(sum(reply[1] for reply in replies))
                if all(len(reply) > 3 for reply in replies):  # the peers' own processes, without their p2pd
                    python_cpus.append(sum(reply[3] for reply in replies))
                checksums = [reply[2] for reply in replies]
                if max(checksums) - min(checksums) > 1e-2 * max(1.0, abs(checksums[0])):
                    raise RuntimeError(f"{kind}: peers ended with different vectors: {checksums}")
            if not times:
                continue
            seconds = stat(times)
            results[size] = {
                "seconds": seconds,
                "mb_per_s": size * 4 / seconds / 1e6,
                "cpu_ms_per_mib": 1e3 * stat(cpus) / (size * 4 / MiB),
                "python_ms_per_mib": 1e3 * stat(python_cpus) / (size * 4 / MiB) if python_cpus else None,
            }
    finally:
        for connection in connections:
            try:
                connection.send(None)
            except (BrokenPipeError, OSError):
                pass
        for process in processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--sizes", nargs="+", default=["1M", "16M", "64M"], help="float32 elements (K/M suffixes)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--torch-threads", type=int, default=0, help="torch threads per peer (0: default)")
    parser.add_argument("--only", choices=["hivemind", "gloo"], default=None, help="measure one side only")
    parser.add_argument(
        "--stat", choices=["median", "min"], default="median", help="per-round figure reported (min: least disturbed)"
    )
    parser.add_argument(
        "--part-size",
        type=parse_size,
        default=DEFAULT_PART_SIZE,
        help="part_size_bytes of hivemind's peers (K/M suffixes, binary: 2M = 2 MiB); every peer of a group must use "
        "the same",
    )
    parser.add_argument(
        "--averager", action="store_true", help="also through DecentralizedAverager (public API, own processes)"
    )
    args = parser.parse_args()
    sizes = [parse_size(size) for size in args.sizes]
    kinds = [args.only] if args.only else ["hivemind", "gloo"]
    kinds += ["averager"] if args.averager else []
    rounds = f"{args.stat} of {args.repeats} rounds"
    parts = f"parts of {args.part_size / 2**10:g} KiB"
    print(f"all-reduce benchmark: float32, peers on 127.0.0.1, {rounds}, {parts}, {os.cpu_count()} CPUs")
    header = "| peers | elements | hivemind MB/s (s) | gloo MB/s (s) | hivemind / gloo | CPU ms/MiB hivemind | gloo |"
    header += " DecentralizedAverager MB/s (s) | its CPU ms/MiB |" if args.averager else ""
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    for num_peers in args.peers:
        stat = min if args.stat == "min" else statistics.median
        results = {
            kind: measure(kind, num_peers, sizes, args.repeats, args.torch_threads, stat, args.part_size)
            for kind in kinds
        }
        for size in sizes:
            ours, gloo = results.get("hivemind", {}).get(size), results.get("gloo", {}).get(size)
            ours_text = f"{ours['mb_per_s']:.0f} ({ours['seconds']:.3f})" if ours else "-"
            gloo_text = f"{gloo['mb_per_s']:.0f} ({gloo['seconds']:.3f})" if gloo else "-"
            ratio = f"{ours['mb_per_s'] / gloo['mb_per_s']:.2f}" if ours and gloo else "-"
            cpu_ours = f"{ours['cpu_ms_per_mib']:.2f}" if ours else "-"
            if ours and ours["python_ms_per_mib"] is not None:
                cpu_ours += f" ({ours['python_ms_per_mib']:.2f} Python)"
            cpu_gloo = f"{gloo['cpu_ms_per_mib']:.2f}" if gloo else "-"
            label = f"{size // 2**20}M" if size % 2**20 == 0 else str(size)
            line = f"| {num_peers} | {label} | {ours_text} | {gloo_text} | {ratio} | {cpu_ours} | {cpu_gloo} |"
            averager = results.get("averager", {}).get(size)
            if averager:
                line += f" {averager['mb_per_s']:.0f} ({averager['seconds']:.3f}) | {averager['cpu_ms_per_mib']:.2f} |"
            print(line)
            sys.stdout.flush()


if __name__ == "__main__":
    main()
