"""How long an honest caller waits for an expert while another peer floods it with full batches.

A server (``Server.create``: one ffn expert, one handler thread, its own DHT and p2pd, in this process) serves two
clients with their own P2P: a flooder that keeps ``--flood`` forward calls of ``--max-batch`` rows in flight, and an
honest caller that makes ``--calls`` one-row forward calls one after the other, first alone, then during the flood.
Printed: the honest latencies (median and max) alone and under the flood, and the flood's own median latency.
``--fifo`` submits every task as one caller's (how the pools batched before they took callers' tasks in turn);
``--other-expert``: the server hosts a second expert, and the honest caller calls that one.

    python benchmarks/moe_compute_flood.py                 # 64 x 1024 rows of hidden 256
    python benchmarks/moe_compute_flood.py --fifo
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import torch

from hivemind.compression import serialize_torch_tensor
from hivemind.moe.server import Server
from hivemind.moe.server.connection_handler import ConnectionHandler
from hivemind.moe.server.task_pool import TaskPool
from hivemind.p2p import P2P
from hivemind.proto import runtime_pb2

UID, OTHER_UID = "ffn.0", "ffn.1"


def forward_request(rows: int, hidden: int, uid: str = UID) -> runtime_pb2.ExpertRequest:
    return runtime_pb2.ExpertRequest(uid=uid, tensors=[serialize_torch_tensor(torch.randn(rows, hidden))])


async def honest_calls(stub, count: int, hidden: int, uid: str):
    latencies = []
    for _ in range(count):
        started = time.perf_counter()
        await stub.rpc_forward(forward_request(1, hidden, uid), timeout=120)
        latencies.append(time.perf_counter() - started)
    return latencies


def summary(latencies) -> str:
    return f"median {statistics.median(latencies) * 1000:7.1f} ms, max {max(latencies) * 1000:7.1f} ms"


async def main(args):
    if args.fifo:
        submit_task = TaskPool.submit_task
        TaskPool.submit_task = lambda pool, *tensors, owner=None: submit_task(pool, *tensors)
    torch.set_num_threads(args.threads)
    server = Server.create(
        expert_uids=[UID, OTHER_UID] if args.other_expert else [UID],
        expert_cls="ffn",
        hidden_dim=args.hidden,
        max_batch_size=args.max_batch,
        host_maddrs=["/ip4/127.0.0.1/tcp/0"],
        start=True,
    )
    maddrs = [str(maddr) for maddr in server.dht.get_visible_maddrs()]
    flooder, honest = await P2P.create(initial_peers=maddrs), await P2P.create(initial_peers=maddrs)
    flood_stub = ConnectionHandler.get_stub(flooder, server.dht.peer_id)
    honest_stub = ConnectionHandler.get_stub(honest, server.dht.peer_id)
    stop, flood_latencies, measuring = asyncio.Event(), [], [False]
    request = forward_request(args.max_batch, args.hidden)

    async def flood():
        while not stop.is_set():
            started = time.perf_counter()
            await flood_stub.rpc_forward(request, timeout=300)
            if measuring[0]:
                flood_latencies.append(time.perf_counter() - started)

    try:
        honest_uid = OTHER_UID if args.other_expert else UID
        await honest_calls(honest_stub, 3, args.hidden, honest_uid)  # warm-up
        alone = await honest_calls(honest_stub, args.calls, args.hidden, honest_uid)
        flooding = [asyncio.create_task(flood()) for _ in range(args.flood)]
        await asyncio.sleep(args.settle)
        measuring[0] = True
        flooded = await honest_calls(honest_stub, args.calls, args.hidden, honest_uid)
        measuring[0] = False
        stop.set()
        await asyncio.gather(*flooding)
        mode = "one queue in arrival order (--fifo)" if args.fifo else "callers in turn"
        print(f"{mode}: {args.flood} x {args.max_batch} rows of hidden {args.hidden} in flight to {UID}")
        print(f"the honest caller calls {honest_uid}")
        print(f"honest alone:        {summary(alone)}")
        print(f"honest under flood:  {summary(flooded)}")
        print(f"flood calls:         {summary(flood_latencies)} ({len(flood_latencies)} calls)")
    finally:
        await flooder.shutdown()
        await honest.shutdown()
        server.shutdown()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--max-batch", type=int, default=1024)
    parser.add_argument("--flood", type=int, default=64, help="concurrent full-batch calls of the flooder")
    parser.add_argument("--calls", type=int, default=20, help="sequential one-row calls of the honest caller")
    parser.add_argument("--settle", type=float, default=3.0, help="seconds of flood before the honest calls")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the server")
    parser.add_argument("--other-expert", action="store_true", help="the honest caller calls another expert")
    parser.add_argument("--fifo", action="store_true", help="every task as one caller's (the behaviour before)")
    asyncio.run(main(parser.parse_args()))
