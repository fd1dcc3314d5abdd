"""Refusals of honest MoE traffic by a server's inbound budget: one client calls k experts of one server at once.

A server hosts ``--experts`` linear experts (``ConnectionHandler`` in a thread of this process, so that its
``InboundBudget`` can be watched); a client's ``RemoteMixtureOfExperts`` with ``k_best`` = ``k_min`` = all of them
sends every batch to every expert at once, forward and backward, so that large inputs go out as streams of
``STREAM_CHUNK_SIZE_BYTES`` chunks on ``--experts`` streams of the same peer. Printed: each step's time, then how many
frames the budget admitted, refused, and told to wait, and the most bytes one peer held at once.

    python benchmarks/inbound_budget_moe_fanout.py --experts 12 --batch 4096 --steps 3
"""

import argparse
import time

import torch
import torch.nn as nn

from hivemind.dht import DHT
from hivemind.moe import RemoteMixtureOfExperts
from hivemind.moe.server.connection_handler import MAX_STREAM_MESSAGE_BYTES, ConnectionHandler
from hivemind.moe.server.dht_handler import DHTHandlerThread
from hivemind.moe.server.module_backend import ModuleBackend
from hivemind.moe.server.runtime import Runtime
from hivemind.p2p import inbound_budget
from hivemind.utils.tensor_descr import BatchTensorDescriptor

MiB = 1024**2


class WatchedBudget:
    """Patches InboundBudget to count admitted, refused and waiting frames and the largest share held."""

    def __init__(self):
        self.admitted = self.waited = self.peak = 0
        self.refusals = []
        budget_type = inbound_budget.InboundBudget
        reserve, fits_peer = budget_type.reserve, getattr(budget_type, "fits_peer", None)
        watch = self

        async def watched_reserve(budget, peer, nbytes, max_message_size=None):
            try:
                await reserve(budget, peer, nbytes, max_message_size)
            except inbound_budget.InboundBudgetExceeded as e:
                watch.refusals.append(str(e))
                raise
            watch.admitted += 1
            watch.peak = max(watch.peak, budget.held_by(peer))

        def watched_fits_peer(budget, peer, nbytes, max_message_size=None):
            fits = fits_peer(budget, peer, nbytes, max_message_size)
            watch.waited += not fits
            return fits

        budget_type.reserve = watched_reserve
        if fits_peer is not None:  # (versions before requests waiting for their handler were counted lack it)
            budget_type.fits_peer = watched_fits_peer


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, default=12)
    parser.add_argument("--hid_dim", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    watch = WatchedBudget()

    backends = {}
    for index in range(args.experts):
        module = nn.Sequential(nn.Linear(args.hid_dim, args.hid_dim), nn.ReLU())
        backends[f"x.{index}"] = ModuleBackend(
            f"x.{index}",
            module,
            optimizer=torch.optim.SGD(module.parameters(), lr=1e-3),
            args_schema=(BatchTensorDescriptor(args.hid_dim),),
            max_batch_size=65536,
        )
    server_dht = DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    runtime = Runtime(backends)
    runtime.start()
    handler = ConnectionHandler(server_dht, backends)
    handler.run_in_thread(await_ready=True, timeout=60)
    announcer = DHTHandlerThread(backends, server_dht, update_period=10)
    announcer.start()
    client_dht = DHT(start=True, initial_peers=server_dht.get_visible_maddrs(), host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    try:
        assert runtime.ready.wait(30), "the runtime did not start"
        k = args.experts
        moe = RemoteMixtureOfExperts(
            in_features=args.hid_dim, grid_size=(k,), dht=client_dht, uid_prefix="x.", k_best=k, k_min=k,
            backward_k_min=k, forward_timeout=300, backward_timeout=300, timeout_after_k_min=300,
        )  # fmt: skip
        for step in range(args.steps):
            inputs = torch.randn(args.batch, args.hid_dim, requires_grad=True)
            started = time.perf_counter()
            moe(inputs).sum().backward()
            print(f"step {step}: {time.perf_counter() - started:.1f} s", flush=True)
    finally:
        limit = inbound_budget.InboundBudget().per_peer_limit(MAX_STREAM_MESSAGE_BYTES)
        print(
            f"frames admitted {watch.admitted}, refused {len(watch.refusals)}, told to wait {watch.waited}; "
            f"most held by one peer {watch.peak / MiB:.1f} of {limit / MiB:.0f} MiB"
        )
        for refusal in watch.refusals[:3]:
            print("  refused:", refusal)
        client_dht.shutdown()
        announcer.shutdown()
        handler.shutdown()
        runtime.shutdown(timeout=10)
        server_dht.shutdown()


if __name__ == "__main__":
    main()
