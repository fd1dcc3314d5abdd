#!/usr/bin/env python3
"""
The monitor peer: logs the loss that the trainers of a run publish after each epoch, and every few epochs downloads
the swarm's latest model and optimizer state and saves it as a checkpoint (with its loss on held-out stdlib files).
It does not train; it may also be the first peer of a run (it prints the --initial_peers for the trainers).

    python run_monitor.py --initial_peers /ip4/.../p2p/Qm... --checkpoint_dir checkpoints
"""

import argparse
import time

from metrics import add_metrics_validators, fetch_metrics
from swarm import add_swarm_arguments, ignore_ctrl_c, join_swarm, stop_on_first_ctrl_c

import hivemind


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_swarm_arguments(parser)
    parser.add_argument("--checkpoint_dir", default="checkpoints", help="where checkpoint.pt is written")
    parser.add_argument("--checkpoint_every", type=int, default=5, help="save a checkpoint every this many epochs")
    parser.add_argument("--refresh_period", type=float, default=2.0, help="seconds between reads of the metrics")
    parser.add_argument("--load_state_timeout", type=float, default=60.0, help="seconds for one state download")
    args = parser.parse_args()
    stop_on_first_ctrl_c()

    try:
        with join_swarm(args) as dht:  # before torch loads (see swarm.py)
            last_saved = monitor(dht, args)
    except KeyboardInterrupt:  # Ctrl-C while starting up: nothing was saved yet
        print("interrupted while starting", flush=True)
        last_saved = 0
    saved = f"last checkpoint: epoch {last_saved}" if last_saved else "no checkpoint saved"
    print(f"monitor finished ({saved})", flush=True)


def monitor(dht: hivemind.DHT, args: argparse.Namespace) -> int:
    """Log the trainers' loss and save checkpoints until Ctrl-C; returns the epoch of the last checkpoint saved."""
    add_metrics_validators(dht, args.run_id)
    from checkpoints import CheckpointSaver  # loads torch (seconds), once this peer's address is out
    from data import load_corpus

    _, validation_corpus = load_corpus(args.data_bytes)
    saver = CheckpointSaver(dht, args, validation_corpus)

    last_logged = -1
    last_failed = -1  # the trainers' latest epoch when a checkpoint could not be saved: retried at a newer one
    try:  # from here on, Ctrl-C shuts the saver down: even one that comes just as the line below is printed
        print(f"monitoring run {args.run_id!r}", flush=True)
        while True:
            records = fetch_metrics(dht, args.run_id)
            latest = max((record.epoch for record in records), default=-1)
            if latest > last_logged:
                current = [record for record in records if record.epoch == latest]
                samples = sum(record.samples for record in current)
                mean_loss = sum(record.loss * record.samples for record in current) / max(samples, 1)
                print(f"epoch {latest}: mean loss {mean_loss:.3f} reported by {len(current)} peers ({samples} "
                      f"samples); {len(records)} peers publishing", flush=True)  # fmt: skip
                last_logged = latest
            due = latest + 1 >= saver.last_saved_epoch + args.checkpoint_every  # latest + 1: the trainers' epoch
            if due and latest > last_failed and saver.save() is None:
                last_failed = latest  # (the trainers may have left: asking again each refresh would only log noise)
            time.sleep(args.refresh_period)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
    finally:
        saver.shutdown()
    return saver.last_saved_epoch  # also right when Ctrl-C came just after a checkpoint was written


if __name__ == "__main__":
    main()
    ignore_ctrl_c()
