#!/usr/bin/env python3
"""
The monitor peer: logs the loss that the trainers of a run publish after each epoch, and every few epochs downloads
the swarm's latest model and optimizer state and saves it as a checkpoint (with its loss on held-out stdlib files).
It does not train; it may also be the first peer of a run (it prints the --initial_peers for the trainers).

    python run_monitor.py --initial_peers /ip4/.../p2p/Qm... --checkpoint_dir checkpoints
"""

import argparse
import os
import time
from functools import partial
from pathlib import Path
from typing import Optional

import torch
from data import evaluate, load_corpus
from metrics import add_metrics_validators, fetch_metrics
from model import make_model
from run_trainer import add_swarm_arguments, print_address

import hivemind
from hivemind.optim import TrainingStateAverager


class CheckpointSaver:
    """Downloads the training state from the trainers and writes it to ``<checkpoint_dir>/checkpoint.pt``."""

    def __init__(self, dht: hivemind.DHT, args: argparse.Namespace, validation_corpus: torch.Tensor):
        self.args, self.validation_corpus = args, validation_corpus
        self.model = make_model(args)
        # the same optimizer as the trainers (a state saved by another optimizer would be refused); this peer only
        # downloads: it never averages and does not offer its state to others
        self.averager = TrainingStateAverager(
            dht=dht, optimizer=partial(torch.optim.Adam, lr=args.lr), params=self.model.parameters(),
            prefix=f"{args.run_id}_state_averager", allow_state_sharing=False, start=True,
        )  # fmt: skip
        self.directory = Path(args.checkpoint_dir)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._failing = False  # the last attempt saved nothing (said once, not at every retry)

    def save(self) -> Optional[int]:
        """The epoch saved, or None if no trainer shared a newer state (failures are logged, the monitor goes on)."""
        epoch_before = self.averager.local_epoch
        try:
            loaded = self.averager.load_state_from_peers(timeout=self.args.load_state_timeout)
        except Exception as e:
            return self._failed(f"could not download the state ({e!r})")
        if loaded is None or self.averager.local_epoch <= epoch_before:
            return self._failed("no trainer shared a newer state")
        self._failing = False
        epoch = self.averager.local_epoch
        validation_loss = evaluate(self.model, self.validation_corpus, self.args.seq_length)
        checkpoint = dict(epoch=epoch, validation_loss=validation_loss, model=self.model.state_dict(),
                          optimizer=self.averager.optimizer.state_dict(), config=vars(self.args))  # fmt: skip
        path = self.directory / "checkpoint.pt"
        temporary = path.with_suffix(".tmp")
        torch.save(checkpoint, temporary)
        os.replace(temporary, path)  # never a half-written checkpoint, even if the monitor is killed meanwhile
        print(f"saved checkpoint of epoch {epoch} to {path} (validation loss {validation_loss:.3f})", flush=True)
        return epoch

    def _failed(self, reason: str) -> None:
        if not self._failing:
            print(f"{reason}; trying again every {self.args.refresh_period} s", flush=True)
        self._failing = True
        return None

    def shutdown(self) -> None:
        self.averager.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_swarm_arguments(parser)
    parser.add_argument("--checkpoint_dir", default="checkpoints", help="where checkpoint.pt is written")
    parser.add_argument("--checkpoint_every", type=int, default=5, help="save a checkpoint every this many epochs")
    parser.add_argument("--refresh_period", type=float, default=2.0, help="seconds between reads of the metrics")
    parser.add_argument("--load_state_timeout", type=float, default=60.0, help="seconds for one state download")
    args = parser.parse_args()

    dht = hivemind.DHT(initial_peers=args.initial_peers, host_maddrs=args.host_maddrs, start=True)
    print_address(dht)
    add_metrics_validators(dht, args.run_id)
    _, validation_corpus = load_corpus(args.data_bytes)
    saver = CheckpointSaver(dht, args, validation_corpus)
    print(f"monitoring run {args.run_id!r}", flush=True)

    last_logged, last_saved = -1, 0
    try:
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
            if latest + 1 >= last_saved + args.checkpoint_every:  # latest + 1: the epoch the trainers are in
                saved = saver.save()
                last_saved = saved if saved is not None else last_saved
            time.sleep(args.refresh_period)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
    finally:
        saver.shutdown()
        dht.shutdown()
    print(f"monitor finished (last checkpoint: epoch {last_saved})", flush=True)


if __name__ == "__main__":
    main()
