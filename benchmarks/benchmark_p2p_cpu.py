"""CPU time per streamed MiB of the Python process and of each p2pd daemon, between two local peers.

On a machine with few cores, stream throughput follows the CPU time every byte costs, and that figure is far less
noisy than MB/s. Uses only the public API (runs under the original hivemind too):

    python benchmarks/benchmark_p2p_cpu.py --calls 30 --size-mib 64
"""

import argparse
import asyncio
import os
import sys
import time

import psutil

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchmark_p2p import MiB, count_bytes, measure_stream  # noqa: E402

from hivemind.p2p import P2P  # noqa: E402
from hivemind.proto import runtime_pb2  # noqa: E402


def minor_faults(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as stat:
        return int(stat.read().rsplit(")", 1)[1].split()[7])


async def main(args: argparse.Namespace) -> None:
    callee = await P2P.create()
    caller = await P2P.create(initial_peers=await callee.get_visible_maddrs())
    try:
        await callee.add_protobuf_handler(
            "bench.count_bytes", count_bytes, runtime_pb2.Tensor, stream_input=True, stream_output=True
        )
        size = int(args.size_mib * MiB)
        await measure_stream(caller, callee, size, MiB, 2)  # warm-up
        daemons = [p for p in psutil.Process().children(recursive=True) if p.name().startswith("p2pd")]
        # the callee started first, so its daemon (the receiving one) comes first
        processes = {"python (both peers)": psutil.Process(), "p2pd, receiving": daemons[0]}
        processes["p2pd, sending"] = daemons[1]
        cpu_before = {name: p.cpu_times() for name, p in processes.items()}
        faults_before = {name: minor_faults(p.pid) for name, p in processes.items()}
        started = time.perf_counter()
        best = await measure_stream(caller, callee, size, MiB, args.calls)
        elapsed = time.perf_counter() - started
        total_mib = args.calls * args.size_mib
        mean = total_mib * MiB / elapsed / 1e6
        print(f"{args.calls} calls x {args.size_mib:g} MiB: best {best:.0f} MB/s, mean {mean:.0f} MB/s")
        print("| process | user ms/MiB | system ms/MiB | minor faults/MiB |")
        print("|---|---|---|---|")
        total = 0.0
        for name, process in processes.items():
            after, before = process.cpu_times(), cpu_before[name]
            user, system = (after.user - before.user) / total_mib, (after.system - before.system) / total_mib
            faults = (minor_faults(process.pid) - faults_before[name]) / total_mib
            total += user + system
            print(f"| {name} | {1e3 * user:.3f} | {1e3 * system:.3f} | {faults:.1f} |")
        print(f"| total | {1e3 * total:.3f} ms/MiB | | |")
    finally:
        await caller.shutdown()
        await callee.shutdown()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=30, help="streaming calls to measure")
    parser.add_argument("--size-mib", type=float, default=64, help="payload per call, MiB (in 1 MiB messages)")
    arguments = parser.parse_args()
    import uvloop

    uvloop.install()
    asyncio.run(main(arguments))
