"""Memory of a P2P whose stream handler takes none of its input while one peer parks complete requests on many streams.

A server process serves ``parked`` (stream input, ``max_message_size`` 5 MiB) with a handler that waits forever
without reading its requests. This process opens ``--streams`` streams to it and writes ``--requests`` complete
4.5 MB requests (and the end of the input) on each, holds them for ``--hold`` seconds, then closes them. Printed: how
many requests the server's inbound budget holds, how many streams were refused, and the RSS of the server's Python
process and of its p2pd at the start, at their peak and at the end.

    python benchmarks/inbound_budget_parked.py --streams 100 --requests 5
"""

import argparse
import asyncio
import os
import subprocess
import sys
import time

import psutil

from hivemind.p2p import P2P, PeerID, framing
from hivemind.proto import runtime_pb2

MiB = 1024**2
HANDLER = "parked"
ANNOUNCED = 4_500_000


async def serve() -> None:
    server = await P2P.create()

    async def never_reads(requests, context):
        await asyncio.Event().wait()

    await server.add_protobuf_handler(
        HANDLER, never_reads, runtime_pb2.Tensor, stream_input=True, max_message_size=5 * MiB
    )
    maddrs = " ".join(str(maddr) for maddr in await server.get_visible_maddrs())
    print(maddrs, flush=True)
    loop = asyncio.get_running_loop()
    while True:  # report what the budget holds until the parent closes stdin
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            break
        print(server.inbound_budget.total_held, flush=True)
    await server.shutdown()


def rss_mib(process: psutil.Process) -> float:
    return process.memory_info().rss / MiB


async def attack(args) -> None:
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        maddrs = server.stdout.readline().split()
        server_process = psutil.Process(server.pid)
        p2pd = next(child for child in server_process.children(recursive=True) if "p2pd" in child.name())
        processes = {"python": server_process, "p2pd": p2pd}
        start = {name: rss_mib(p) for name, p in processes.items()}
        peak = dict(start)
        attacker = await P2P.create(initial_peers=maddrs)
        await attacker.wait_for_at_least_n_peers(1, attempts=100, delay=0.05)
        server_id = PeerID.from_base58(maddrs[0].rsplit("/", 1)[-1])
        frame = framing.encode_frame(runtime_pb2.Tensor(buffer=bytes(ANNOUNCED - 5)))

        async def one():
            _, _, writer = await attacker.call_binary_stream_handler(server_id, HANDLER)
            for _ in range(args.requests):
                writer.write(frame)
            writer.write(framing.END_OF_STREAM_FRAME)
            try:  # a stream whose handler does not read stops taking data once p2pd's window is full
                await asyncio.wait_for(writer.drain(), args.hold)
            except (asyncio.TimeoutError, ConnectionError):
                pass
            return writer

        async def sample(until: float) -> None:
            while time.monotonic() < until:
                for name, process in processes.items():
                    peak[name] = max(peak[name], rss_mib(process))
                await asyncio.sleep(0.1)

        began = time.monotonic()
        sampling = asyncio.create_task(sample(began + args.hold + 2))
        writers = await asyncio.gather(*(one() for _ in range(args.streams)))
        await asyncio.sleep(max(0.0, began + args.hold - time.monotonic()))  # hold the streams open
        server.stdin.write("\n")
        server.stdin.flush()
        held = int(await asyncio.get_running_loop().run_in_executor(None, server.stdout.readline))
        for writer in writers:
            writer.close()
        await sampling
        end = {name: rss_mib(p) for name, p in processes.items()}
        print(
            f"{args.streams} streams x {args.requests} requests of {ANNOUNCED} bytes, held {args.hold} s: the "
            f"server's inbound budget held {held} bytes ({held // ANNOUNCED} requests)"
        )
        for name in processes:
            rss = f"start {start[name]:.0f} MiB, peak {peak[name]:.0f} MiB, end {end[name]:.0f} MiB"
            print(f"server {name} RSS: {rss}")
        await attacker.shutdown()
    finally:
        server.stdin.close()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=100)
    parser.add_argument("--requests", type=int, default=5)
    parser.add_argument("--hold", type=float, default=6.0)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    asyncio.run(serve() if args.serve else attack(args))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
