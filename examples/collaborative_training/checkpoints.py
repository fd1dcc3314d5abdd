"""The monitor's checkpoints: the swarm's latest model and optimizer state, downloaded from the trainers."""

import argparse
import os
from functools import partial
from pathlib import Path
from typing import Optional

import torch
from data import evaluate
from model import make_model

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
        self.last_saved_epoch = 0  # the epoch of the checkpoint on disk (0: none saved yet)

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
        try:
            torch.save(checkpoint, temporary)
            os.replace(temporary, path)  # never a half-written checkpoint, even if the monitor is killed meanwhile
        except BaseException:  # e.g. Ctrl-C while writing: no half-written file is left next to the checkpoint
            temporary.unlink(missing_ok=True)
            raise
        self.last_saved_epoch = epoch
        print(f"saved checkpoint of epoch {epoch} to {path} (validation loss {validation_loss:.3f})", flush=True)
        return epoch

    def _failed(self, reason: str) -> None:
        if not self._failing:
            print(f"{reason}; trying again when the trainers report a newer epoch", flush=True)
        self._failing = True
        return None

    def shutdown(self) -> None:
        self.averager.shutdown()
