"""Does a long-lived peer's state grow while others come and go? Prints counts every --report iterations.

    python benchmarks/resource_growth.py dht --iterations 300      # a bootstrap node under churn
    python benchmarks/resource_growth.py streams --iterations 2000 # abandoned calls and streams to one server
    python benchmarks/resource_growth.py handlers --iterations 500 # handlers and replicas added and removed

``dht``: short-lived DHTNodes (each with its own p2pd) join the long-lived one, store values that expire within 2 s,
get them and leave, every other one with its daemon killed. ``streams``: a client cancels unary calls mid-way,
drops protobuf streams after their first answer and closes raw streams without reading. ``handlers``: the server
adds and removes unary and stream handlers, and replicas of its daemon register stream handlers and shut down.

Columns: fds / RSS (KiB) / threads of this process and of the long-lived peer's p2pd, asyncio tasks, and the sizes
of the structures that could grow (routing table, blacklist, storage, pending gets; handler tables). Flat numbers
after the first report (warm-up) mean no growth. Measured on 2 cores: all flat over 80 DHT peers, 1000 rounds of
abandoned calls and 300 handler cycles.
"""

import argparse
import asyncio
import gc
import os
import signal

import psutil

from hivemind.dht.node import DHTNode
from hivemind.p2p import P2P
from hivemind.proto import test_pb2
from hivemind.utils.timed_storage import get_dht_time

Request, Response = test_pb2.TestRequest, test_pb2.TestResponse


def process_counts(prefix: str, pid: int) -> dict:
    process = psutil.Process(pid)
    return {f"{prefix}fds": process.num_fds(), f"{prefix}rss": process.memory_info().rss // 1024,
            f"{prefix}threads": process.num_threads()}  # fmt: skip


def report(label, p2p: P2P, **structures) -> None:
    gc.collect()
    counts = {**process_counts("", os.getpid()), **process_counts("p2pd_", p2p._daemon.pid)}
    counts.update(tasks=len(asyncio.all_tasks()), **structures)
    print(label, " ".join(f"{key}={value}" for key, value in counts.items()), flush=True)


async def dht_churn(iterations: int, every: int) -> None:
    node = await DHTNode.create(cache_refresh_before_expiry=0)
    maddrs = [str(maddr) for maddr in await node.get_visible_maddrs()]

    def structures():
        table = node.protocol.routing_table
        return dict(
            routing=sum(len(bucket.nodes) for bucket in table.buckets),
            replacements=sum(len(bucket.replacements) for bucket in table.buckets),
            blacklist=len(node.blacklist._banned), stored=len(node.protocol.storage.data),
            cached=len(node.protocol.cache.data), pending_gets=len(node._pending_gets),
        )  # fmt: skip

    report("start", node.p2p, **structures())
    for index in range(iterations):
        visitor = await DHTNode.create(initial_peers=maddrs, cache_refresh_before_expiry=0)
        await visitor.store(f"key_{index}", index, get_dht_time() + 2)
        await visitor.store("shared", index, get_dht_time() + 2, subkey=index)
        await visitor.get(f"key_{index}", latest=True)
        if index % 2:
            os.kill(visitor.p2p._daemon.pid, signal.SIGKILL)
        await visitor.shutdown()
        if (index + 1) % every == 0:
            report(index + 1, node.p2p, **structures())
    await asyncio.sleep(2.5)
    await node.get("key_0")
    report("end", node.p2p, **structures())
    await node.shutdown()


async def abandoned_streams(iterations: int, every: int) -> None:
    async def slow_unary(request, context):
        await asyncio.sleep(0.5)
        return Response(number=1)

    async def slow_stream(request, context):
        for number in range(50):
            yield Response(number=number)
            await asyncio.sleep(0.01)

    server = await P2P.create()
    await server.add_protobuf_handler("unary", slow_unary, Request)
    await server.add_protobuf_handler("stream", slow_stream, Request, stream_output=True)
    server_addresses = await server.get_visible_maddrs()
    client = await P2P.create(initial_peers=server_addresses)

    def structures():
        control = server._client
        persistent = control._persistent
        return dict(handler_tasks=len(control._handler_tasks), handler_writers=len(control._handler_writers),
                    unary_tasks=len(persistent._handler_tasks) if persistent else 0)  # fmt: skip

    report("start", server, **structures())
    for index in range(iterations):
        try:
            await asyncio.wait_for(client.call_protobuf_handler(server.peer_id, "unary", Request(), Response), 0.02)
        except asyncio.TimeoutError:
            pass
        responses = await client.iterate_protobuf_handler(server.peer_id, "stream", Request(), Response)
        async for _ in responses:
            break
        await responses.aclose()
        _, _, writer = await client.call_binary_stream_handler(server.peer_id, "stream")
        writer.write(b"\x05junk")
        writer.close()
        if (index + 1) % every == 0:
            await asyncio.sleep(1)
            report(index + 1, server, **structures())
    await client.shutdown()
    await asyncio.sleep(1)
    report("end", server, **structures())
    await server.shutdown()


async def handler_cycles(iterations: int, every: int) -> None:
    async def unary(request, context):
        return Response(number=1)

    async def stream(request, context):
        yield Response(number=1)

    async def raw(info, reader, writer):
        writer.close()

    server = await P2P.create()
    server_addresses = await server.get_visible_maddrs()
    client = await P2P.create(initial_peers=server_addresses)
    report("start", server)
    for index in range(iterations):
        await server.add_protobuf_handler(f"unary_{index}", unary, Request)
        await server.add_protobuf_handler(f"stream_{index}", stream, Request, stream_output=True)
        await client.call_protobuf_handler(server.peer_id, f"unary_{index}", Request(), Response)
        async for _ in await client.iterate_protobuf_handler(server.peer_id, f"stream_{index}", Request(), Response):
            pass
        await server.remove_protobuf_handler(f"unary_{index}")
        await server.remove_protobuf_handler(f"stream_{index}", stream_output=True)
        replica = await P2P.replicate(server.daemon_listen_maddr)
        await replica.add_binary_stream_handler(f"replica_{index}", raw)
        await replica.shutdown()
        if (index + 1) % every == 0:
            report(index + 1, server)
    await client.shutdown()
    await server.shutdown()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scenario", choices=["dht", "streams", "handlers"])
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--report", type=int, default=20, help="print the counts every this many iterations")
    args = parser.parse_args()
    scenario = {"dht": dht_churn, "streams": abandoned_streams, "handlers": handler_cycles}[args.scenario]
    asyncio.run(scenario(args.iterations, args.report))


if __name__ == "__main__":
    main()
