"""CPU time per streamed MiB of p2pd daemon binaries, compared call by call in one process.

On a shared machine the CPU cost of the same binary drifts by 10-20% from one minute to the next, so two runs of
`benchmark_p2p_cpu.py` cannot resolve a change of a few percent. This script starts one pair of peers per binary
(`HIVEMIND_P2PD_PATH` is read when a daemon starts) and alternates stream calls between the pairs, so every binary
sees the same phases of the machine; each call is charged the CPU time its two daemons used during it:

    python benchmarks/benchmark_p2pd_ab.py --calls 24 --bidirectional /tmp/p2pd-old /tmp/p2pd-new

With --bidirectional both peers of a pair stream to each other at once (an all-reduce's traffic: every daemon
encrypts and decrypts at the same time); figures are per MiB streamed in either direction.
"""

import argparse
import asyncio
import os
import statistics
import sys
from typing import Dict, List

import psutil

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchmark_p2p import MiB, count_bytes, measure_stream  # noqa: E402

from hivemind.p2p import P2P  # noqa: E402
from hivemind.proto import runtime_pb2  # noqa: E402


async def start_pair(binary: str):
    os.environ["HIVEMIND_P2PD_PATH"] = binary
    known = {p.pid for p in psutil.Process().children(recursive=True)}
    callee = await P2P.create()
    caller = await P2P.create(initial_peers=await callee.get_visible_maddrs())
    for peer in (caller, callee):
        await peer.add_protobuf_handler(
            "bench.count_bytes", count_bytes, runtime_pb2.Tensor, stream_input=True, stream_output=True
        )
    daemons = [
        p for p in psutil.Process().children(recursive=True) if p.pid not in known and p.name().startswith("p2pd")
    ]
    assert len(daemons) == 2, f"expected the two daemons of {binary}, found {daemons}"
    return caller, callee, daemons


def cpu_seconds(processes: List[psutil.Process]) -> List[float]:
    return [sum(p.cpu_times()[:2]) for p in processes]


async def main(args: argparse.Namespace) -> None:
    labels = [f"{i}: {os.path.basename(b)}" for i, b in enumerate(args.binaries)]
    pairs = [await start_pair(b) for b in args.binaries]
    size = args.size_mib * MiB
    per_call: Dict[str, List[List[float]]] = {label: [] for label in labels}
    me = psutil.Process()
    try:
        for caller, callee, _ in pairs:
            await measure_stream(caller, callee, size, MiB, 2)  # warm-up: connection, pipe files
        for call in range(args.calls):
            order = list(zip(labels, pairs))
            for label, (caller, callee, daemons) in order if call % 2 == 0 else order[::-1]:
                processes = daemons + [me]
                before = cpu_seconds(processes)
                if args.bidirectional:
                    await asyncio.gather(
                        measure_stream(caller, callee, size, MiB, 1), measure_stream(callee, caller, size, MiB, 1)
                    )
                else:
                    await measure_stream(caller, callee, size, MiB, 1)
                streamed_mib = args.size_mib * (2 if args.bidirectional else 1)
                after = cpu_seconds(processes)
                per_call[label].append([1e3 * (a - b) / streamed_mib for a, b in zip(after, before)])
    finally:
        for caller, callee, _ in pairs:
            await caller.shutdown()
            await callee.shutdown()
    mode = "both directions at once" if args.bidirectional else "one direction"
    print(f"{args.calls} calls of {args.size_mib} MiB per binary, {mode}, interleaved; load {os.getloadavg()[0]:.1f}")
    print("| binary | both daemons, CPU ms/MiB (mean / median) | daemon 1 | daemon 2 | python (both peers) |")
    print("|---|---|---|---|---|")
    for label in labels:
        rows = per_call[label]
        daemons = [r[0] + r[1] for r in rows]
        print(
            f"| {label} | {statistics.mean(daemons):.3f} / {statistics.median(daemons):.3f} "
            f"| {statistics.mean(r[0] for r in rows):.3f} | {statistics.mean(r[1] for r in rows):.3f} "
            f"| {statistics.mean(r[2] for r in rows):.3f} |"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("binaries", nargs="+", help="p2pd binaries to compare")
    parser.add_argument("--calls", type=int, default=24, help="stream calls per binary")
    parser.add_argument("--size-mib", type=int, default=64, help="MiB per call (in 1 MiB messages)")
    parser.add_argument("--bidirectional", action="store_true", help="both peers stream to each other at once")
    asyncio.run(main(parser.parse_args()))
