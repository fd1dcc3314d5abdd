"""A decentralized mixture-of-experts layer trained on CPU: one expert server, one trainer, all on this machine.

The server (``background_server``, a separate process) hosts four small ``ffn`` experts named ``expert.0.0`` ...
``expert.1.1`` (a 2 x 2 grid) and announces them in its DHT. The trainer joins that DHT and builds a model whose
middle layer is a ``RemoteMixtureOfExperts``: for every sample a local gating layer scores the grid, a beam search
over the DHT picks the 2 best experts, and their answers are mixed with softmax weights. ``loss.backward()`` sends
the gradients back through the network, so each backward call also trains the remote experts with their own
optimizer (Adam on the server), while the trainer's optimizer trains the local layers and the gating.

The task is synthetic regression (a fixed random teacher network); the loss printed every few steps goes down.

python examples/moe.py [--steps 60]

Ctrl-C stops it at any point once hivemind is imported: the trainer's DHT peer and the server are shut down, then it
prints "interrupted" (exit code 130). During the first seconds, while Python imports hivemind and torch, it ends with a
KeyboardInterrupt traceback instead (nothing has started yet).
"""

import argparse
import os
import signal
import sys
import time
from functools import partial

import torch
import torch.nn as nn

from hivemind.dht import DHT
from hivemind.moe import RemoteMixtureOfExperts
from hivemind.moe.server import background_server

HIDDEN = 32
GRID = (2, 2)
EXPERT_UIDS = [f"expert.{i}.{j}" for i in range(GRID[0]) for j in range(GRID[1])]
BATCH_SIZE = 64


def make_teacher() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(HIDDEN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60, help="training steps")
    args = parser.parse_args()
    if args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    started = time.perf_counter()

    server_options = dict(
        expert_uids=EXPERT_UIDS,
        expert_cls="ffn",
        hidden_dim=HIDDEN,
        optim_cls=partial(torch.optim.Adam, lr=1e-3),  # each expert is trained on the server by its own optimizer
        max_batch_size=1024,
        update_period=10,  # re-announce the experts in the DHT every 10 s
        host_maddrs=["/ip4/127.0.0.1/tcp/0"],
    )
    with background_server(**server_options) as server_info:
        print(f"server {server_info.peer_id} hosts {len(EXPERT_UIDS)} experts: {', '.join(EXPERT_UIDS)}")
        dht = DHT(
            initial_peers=[str(maddr) for maddr in server_info.addrs],
            host_maddrs=["/ip4/127.0.0.1/tcp/0"],
            start=True,
        )
        try:
            train(dht, args.steps)
        finally:
            dht.shutdown()
    print(f"done in {time.perf_counter() - started:.1f} s")


def train(dht: DHT, steps: int) -> None:
    torch.manual_seed(0)
    teacher = make_teacher()
    moe = RemoteMixtureOfExperts(
        in_features=HIDDEN,
        grid_size=GRID,
        dht=dht,
        uid_prefix="expert.",
        k_best=2,  # each sample goes to its 2 best-scoring experts
        forward_timeout=10,  # the whole forward (beam search included) gives up after 10 s
        timeout_after_k_min=1,  # once every sample has an answer, wait at most 1 s more for the others
        allow_zero_outputs=True,  # a sample whose experts all failed gets zeros instead of an error
    )
    model = nn.Sequential(nn.Linear(HIDDEN, HIDDEN), moe, nn.Linear(HIDDEN, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)

    first_losses, last_losses = [], []
    for step in range(steps):
        inputs = torch.randn(BATCH_SIZE, HIDDEN)
        with torch.no_grad():
            targets = teacher(inputs)
        loss = nn.functional.mse_loss(model(inputs), targets)
        optimizer.zero_grad()
        loss.backward()  # also runs the remote experts' backward, which trains them on the server
        optimizer.step()
        if step < 5:
            first_losses.append(loss.item())
        if step >= steps - 5:
            last_losses.append(loss.item())
        if step % 10 == 0 or step == steps - 1:
            print(f"step {step:3d}: loss {loss.item():.4f}")

    first, last = sum(first_losses) / len(first_losses), sum(last_losses) / len(last_losses)
    print(f"mean loss of the first 5 steps {first:.4f}, of the last 5 steps {last:.4f}")
    print("the loss went down" if last < first else "the loss did NOT go down")


def interrupt_once(signal_number, frame) -> None:
    """Ctrl-C: stop what runs; further Ctrl-Cs are ignored, so that they cannot cut the shutdown short."""
    if os.getpid() != SCRIPT_PID:  # a library process forked a moment ago, before it set its own handling
        return
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


SCRIPT_PID = os.getpid()

if __name__ == "__main__":
    signal.signal(signal.SIGINT, interrupt_once)  # (the server's process ignores Ctrl-C: this one stops it)
    try:
        main()
    except KeyboardInterrupt:
        print("interrupted", flush=True)
        sys.exit(130)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # finished: a late Ctrl-C must not break the interpreter's exit
