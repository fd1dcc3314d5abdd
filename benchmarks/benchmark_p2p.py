"""Benchmark of hivemind.p2p between two local peers: unary latency, streaming throughput, peak memory.

Uses only the public API, so the same script also runs against other hivemind installations:

    python benchmarks/benchmark_p2p.py --unary-calls 2000 --stream-sizes-mib 1 16 64

A plain loopback TCP connection (asyncio streams, the same framing) is measured in the same run as a reference.
"""

import argparse
import asyncio
import json
import os
import resource
import time
from typing import AsyncIterator, Dict, List

import psutil

from hivemind.p2p import P2P, P2PContext
from hivemind.proto import runtime_pb2, test_pb2

MiB = 1024**2
HEADER = 9  # 1-byte marker + 8-byte length, as in hivemind stream framing


async def echo(request: test_pb2.TestRequest, context: P2PContext) -> test_pb2.TestResponse:
    return test_pb2.TestResponse(number=request.number)


async def count_bytes(
    requests: AsyncIterator[runtime_pb2.Tensor], context: P2PContext
) -> AsyncIterator[runtime_pb2.Tensor]:
    received = 0
    async for request in requests:
        received += len(request.buffer)
    yield runtime_pb2.Tensor(size=[received])


def percentile(sorted_values: List[float], fraction: float) -> float:
    index = min(len(sorted_values) - 1, max(0, round(fraction * (len(sorted_values) - 1))))
    return sorted_values[index]


async def measure_unary(caller: P2P, callee: P2P, calls: int) -> Dict[str, float]:
    request = test_pb2.TestRequest(number=42)
    for _ in range(min(100, calls)):  # warm-up: connection, caches
        await caller.call_protobuf_handler(callee.peer_id, "bench.echo", request, test_pb2.TestResponse)
    latencies = []
    for _ in range(calls):
        started = time.perf_counter()
        await caller.call_protobuf_handler(callee.peer_id, "bench.echo", request, test_pb2.TestResponse)
        latencies.append(time.perf_counter() - started)
    latencies.sort()
    return {"p50_ms": 1e3 * percentile(latencies, 0.5), "p99_ms": 1e3 * percentile(latencies, 0.99)}


async def measure_stream(caller: P2P, callee: P2P, total_bytes: int, message_bytes: int, repeats: int) -> float:
    """Best-of-``repeats`` throughput in MB/s (10**6 bytes per second) of one streaming call."""
    chunk = os.urandom(message_bytes)
    messages = [runtime_pb2.Tensor(buffer=chunk) for _ in range(total_bytes // message_bytes)]

    async def requests():
        for message in messages:
            yield message

    best = 0.0
    for _ in range(repeats):
        started = time.perf_counter()
        responses = [
            r
            async for r in await caller.iterate_protobuf_handler(
                callee.peer_id, "bench.count_bytes", requests(), runtime_pb2.Tensor
            )
        ]
        elapsed = time.perf_counter() - started
        assert list(responses[0].size) == [total_bytes], f"expected {total_bytes} bytes, got {responses[0].size}"
        best = max(best, total_bytes / elapsed / 1e6)
    return best


async def measure_raw_tcp(total_bytes: int, message_bytes: int, repeats: int) -> float:
    """The same transfer over a plain loopback TCP connection (no daemons, no encryption)."""
    payload = os.urandom(message_bytes)
    done: asyncio.Queue = asyncio.Queue()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        while not reader.at_eof():
            received = 0
            while True:
                try:
                    header = await reader.readexactly(HEADER)
                except asyncio.IncompleteReadError:
                    return  # the client is done
                length = int.from_bytes(header[1:], "big")
                if header[:1] == b"\x01":
                    break
                received += len(await reader.readexactly(length))
            writer.write(received.to_bytes(8, "big"))
            await done.put(received)

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    best = 0.0
    try:
        for _ in range(repeats):
            started = time.perf_counter()
            for _ in range(total_bytes // message_bytes):
                writer.write(b"\x00" + len(payload).to_bytes(8, "big"))
                writer.write(payload)
                await writer.drain()
            writer.write(b"\x01" + bytes(8))
            await writer.drain()
            assert int.from_bytes(await reader.readexactly(8), "big") == total_bytes
            best = max(best, total_bytes / (time.perf_counter() - started) / 1e6)
            await done.get()
    finally:
        writer.close()
        server.close()
    return best


def peak_rss_mib(pid: int) -> float:
    """Peak resident memory (VmHWM) of a process, MiB."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


async def main(args: argparse.Namespace) -> None:
    callee = await P2P.create()
    caller = await P2P.create(initial_peers=await callee.get_visible_maddrs())
    try:
        await callee.add_protobuf_handler("bench.echo", echo, test_pb2.TestRequest)
        await callee.add_protobuf_handler(
            "bench.count_bytes", count_bytes, runtime_pb2.Tensor, stream_input=True, stream_output=True
        )
        rows, figures = [], {}
        unary = await measure_unary(caller, callee, args.unary_calls)
        figures.update(unary_p50_ms=unary["p50_ms"], unary_p99_ms=unary["p99_ms"])
        rows.append((f"unary round trip, {args.unary_calls} calls", f"p50 {unary['p50_ms']:.3f} ms"))
        rows.append(("", f"p99 {unary['p99_ms']:.3f} ms"))
        message_bytes = int(args.message_mib * MiB)
        for size_mib in args.stream_sizes_mib:
            throughput = await measure_stream(caller, callee, int(size_mib * MiB), message_bytes, args.repeats)
            rows.append((f"stream {size_mib:g} MiB in {args.message_mib:g} MiB messages", f"{throughput:.0f} MB/s"))
            figures[f"stream_{size_mib:g}MiB_MBps"] = throughput
        for size_mib in args.stream_sizes_mib[-1:]:
            raw = await measure_raw_tcp(int(size_mib * MiB), message_bytes, args.repeats)
            rows.append((f"raw loopback TCP {size_mib:g} MiB (reference)", f"{raw:.0f} MB/s"))
            figures[f"raw_tcp_{size_mib:g}MiB_MBps"] = raw

        daemons = [p for p in psutil.Process().children(recursive=True) if p.name() == "p2pd"]
        figures["peak_rss_process_MiB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        rows.append(("peak RSS, this process", f"{figures['peak_rss_process_MiB']:.0f} MiB"))
        for index, daemon in enumerate(daemons):
            figures[f"peak_rss_p2pd{index + 1}_MiB"] = peak_rss_mib(daemon.pid)
            rows.append((f"peak RSS, p2pd #{index + 1}", f"{figures[f'peak_rss_p2pd{index + 1}_MiB']:.0f} MiB"))
    finally:
        await caller.shutdown()
        await callee.shutdown()

    loop_name = type(asyncio.get_running_loop()).__module__
    print(f"hivemind.p2p benchmark (event loop: {loop_name}, repeats={args.repeats})")
    width = max(len(name) for name, _ in rows)
    print(f"| {'measurement'.ljust(width)} | value |")
    print(f"|{'-' * (width + 2)}|-------|")
    for name, value in rows:
        print(f"| {name.ljust(width)} | {value} |")
    if args.json:
        print(json.dumps(figures))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--unary-calls", type=int, default=2000, help="sequential unary calls to time")
    parser.add_argument("--stream-sizes-mib", type=float, nargs="+", default=[1, 16, 64], help="payload per call")
    parser.add_argument("--message-mib", type=float, default=1, help="size of each streamed message, MiB")
    parser.add_argument("--repeats", type=int, default=3, help="streaming calls per size; the best one counts")
    parser.add_argument("--json", action="store_true", help="also print the figures as one JSON line at the end")
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="uvloop", help="event loop implementation")
    arguments = parser.parse_args()
    if arguments.loop == "uvloop":
        import uvloop

        uvloop.install()
    asyncio.run(main(arguments))
