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

from swarm import add_swarm_arguments, ignore_ctrl_c, join_swarm, stop_on_first_ctrl_c

import hivemind


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_swarm_arguments(parser)
    parser.add_argument("--client_mode", action="store_true", help="make only outgoing connections (behind a NAT)")
    parser.add_argument("--target_batch_size", type=int, default=256, help="sequences per epoch, whole swarm")
    parser.add_argument("--batch_size", type=int, default=16, help="sequences per local step")
    parser.add_argument("--matchmaking_time", type=float, default=5.0, help="seconds to gather peers for averaging")
    parser.add_argument("--averaging_timeout", type=float, default=30.0, help="seconds before averaging gives up")
    parser.add_argument("--max_epochs", type=int, default=None, help="stop after this epoch (default: run forever)")
    parser.add_argument("--seed", type=int, default=None, help="data order of this peer (default: from its pid)")
    parser.add_argument("--num_threads", type=int, default=None, help="torch CPU threads of this peer")
    parser.add_argument("--verbose", action="store_true", help="progress bar and optimizer log lines")
    args = parser.parse_args()
    if args.client_mode and not args.initial_peers:  # nobody could join it: it would train alone, unnoticed
        parser.error(
            "--client_mode needs --initial_peers: a peer that accepts no connections cannot start a run; "
            "start the first trainer without --client_mode and pass the address it prints"
        )
    stop_on_first_ctrl_c()
    try:
        with join_swarm(args, client_mode=args.client_mode) as dht:  # before torch loads (see swarm.py)
            epoch = train(dht, args)
    except KeyboardInterrupt:  # Ctrl-C while starting up, before the first step
        print("interrupted while starting", flush=True)
        epoch = 0
    print(f"trainer finished at epoch {epoch}", flush=True)


def train(dht: hivemind.DHT, args: argparse.Namespace) -> int:
    """Train until Ctrl-C or ``--max_epochs``, then leave the run; returns the epoch reached."""
    import torch  # loaded only now (seconds), once this peer's address is out
    from data import load_corpus, sample_batch
    from metrics import LocalMetrics, MetricsPublisher
    from model import make_model

    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    train_corpus, _ = load_corpus(args.data_bytes)
    model = make_model(args)
    optimizer = hivemind.Optimizer(
        dht=dht, run_id=args.run_id, target_batch_size=args.target_batch_size, batch_size_per_step=args.batch_size,
        optimizer=partial(torch.optim.Adam, lr=args.lr), params=model.parameters(),
        matchmaking_time=args.matchmaking_time, averaging_timeout=args.averaging_timeout, verbose=args.verbose,
    )  # fmt: skip
    publisher = MetricsPublisher(dht, args.run_id)
    generator = torch.Generator().manual_seed(args.seed if args.seed is not None else os.getpid())

    epoch, loss_sum, steps, started = optimizer.local_epoch, 0.0, 0, time.perf_counter()
    try:  # from here on, Ctrl-C shuts the optimizer down: even one that comes just as the line below is printed
        print(f"trainer joined run {args.run_id!r} at epoch {epoch}", flush=True)
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
                                                   steps=steps, time=hivemind.utils.get_dht_time()))  # fmt: skip
                    print(f"epoch {epoch} done: mean loss {mean_loss:.3f} over {steps} local steps "
                          f"(at {time.perf_counter() - started:.1f} s)", flush=True)  # fmt: skip
                epoch, loss_sum, steps = optimizer.local_epoch, 0.0, 0
    except KeyboardInterrupt:
        print("interrupted: leaving the run", flush=True)
    finally:
        optimizer.shutdown()
    return optimizer.local_epoch


if __name__ == "__main__":
    main()
    ignore_ctrl_c()
