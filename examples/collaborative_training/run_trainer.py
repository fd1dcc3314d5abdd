#!/usr/bin/env python3
"""
One trainer peer: trains the byte-level transformer of model.py on the standard library's source code together with
every other trainer started with the same --run_id, and publishes its loss after each epoch for run_monitor.py.

    python run_trainer.py                                     # the first peer prints its --initial_peers
    python run_trainer.py --initial_peers /ip4/.../p2p/Qm...  # every other peer (use --client_mode behind a NAT)
"""

import argparse
import math
import os
import time
from functools import partial

import torch
from data import load_corpus, sample_batch
from metrics import LocalMetrics, MetricsPublisher
from model import add_model_arguments, make_model

import hivemind


def add_swarm_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by the trainer and the monitor."""
    parser.add_argument("--run_id", default="stdlib_lm", help="peers with the same run_id train one model")
    parser.add_argument("--initial_peers", nargs="*", default=[], help="addresses printed by a running peer")
    parser.add_argument(
        "--host_maddrs",
        nargs="+",
        default=["/ip4/0.0.0.0/tcp/0"],
        help="where this peer listens (the default accepts connections from other machines)",
    )
    parser.add_argument("--data_bytes", type=int, default=2_000_000, help="bytes of stdlib source to train on")
    parser.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate (same on every peer)")
    add_model_arguments(parser)


def print_address(dht: hivemind.DHT) -> None:
    addresses = " ".join(str(address) for address in dht.get_visible_maddrs())
    print(f"To join this run, start more peers with: --initial_peers {addresses}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_swarm_arguments(parser)
    parser.add_argument("--client_mode", action="store_true", help="make only outgoing connections (behind a NAT)")
    parser.add_argument("--target_batch_size", type=int, default=256, help="sequences per epoch, whole swarm")
    parser.add_argument("--batch_size", type=int, default=16, help="sequences per local step")
    parser.add_argument("--matchmaking_time", type=float, default=3.0, help="seconds to gather peers for averaging")
    parser.add_argument("--averaging_timeout", type=float, default=30.0, help="seconds before averaging gives up")
    parser.add_argument("--max_epochs", type=int, default=None, help="stop after this epoch (default: run forever)")
    parser.add_argument("--seed", type=int, default=None, help="data order of this peer (default: from its pid)")
    parser.add_argument("--num_threads", type=int, default=None, help="torch CPU threads of this peer")
    parser.add_argument("--verbose", action="store_true", help="progress bar and optimizer log lines")
    args = parser.parse_args()
    if args.num_threads:
        torch.set_num_threads(args.num_threads)

    dht = hivemind.DHT(
        initial_peers=args.initial_peers, host_maddrs=args.host_maddrs, client_mode=args.client_mode, start=True
    )
    if not args.client_mode:
        print_address(dht)
    train_corpus, _ = load_corpus(args.data_bytes)
    model = make_model(args)
    optimizer = hivemind.Optimizer(
        dht=dht, run_id=args.run_id, target_batch_size=args.target_batch_size, batch_size_per_step=args.batch_size,
        optimizer=partial(torch.optim.Adam, lr=args.lr), params=model.parameters(),
        matchmaking_time=args.matchmaking_time, averaging_timeout=args.averaging_timeout, verbose=args.verbose,
    )  # fmt: skip
    publisher = MetricsPublisher(dht, args.run_id)
    generator = torch.Generator().manual_seed(args.seed if args.seed is not None else os.getpid())
    print(f"trainer joined run {args.run_id!r} at epoch {optimizer.local_epoch}", flush=True)

    epoch, loss_sum, steps, started = optimizer.local_epoch, 0.0, 0, time.perf_counter()
    try:
        while args.max_epochs is None or optimizer.local_epoch < args.max_epochs:
            inputs, targets = sample_batch(train_corpus, args.batch_size, args.seq_length, generator)
            loss = model.loss(inputs, targets)
            loss.backward()
            optimizer.step()  # accumulates; at the end of the swarm's epoch, averages and updates the model
            optimizer.zero_grad()
            if math.isfinite(loss.item()):
                loss_sum, steps = loss_sum + loss.item(), steps + 1
            if optimizer.local_epoch != epoch:
                if steps:
                    mean_loss = loss_sum / steps
                    publisher.publish(LocalMetrics(epoch=epoch, loss=mean_loss, samples=steps * args.batch_size,
                                                   steps=steps, time=hivemind.get_dht_time()))  # fmt: skip
                    print(f"epoch {epoch} done: mean loss {mean_loss:.3f} over {steps} local steps "
                          f"(at {time.perf_counter() - started:.1f} s)", flush=True)  # fmt: skip
                epoch, loss_sum, steps = optimizer.local_epoch, 0.0, 0
    except KeyboardInterrupt:
        print("interrupted: leaving the run", flush=True)
    finally:
        optimizer.shutdown()
        dht.shutdown()
    print(f"trainer finished at epoch {optimizer.local_epoch}", flush=True)


if __name__ == "__main__":
    main()
