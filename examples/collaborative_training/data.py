"""Training text that ships with Python itself: the standard library's own .py source files, read as bytes."""

import os
import sysconfig
import zlib
from pathlib import Path
from typing import Iterator, Tuple

import torch

SKIPPED_DIRECTORIES = {"site-packages", "dist-packages", "__pycache__"}  # third-party code differs between machines


def stdlib_source_files() -> Iterator[Path]:
    """The standard library's .py files in a fixed order (the same on every peer with the same Python): directories
    walked in sorted order, so that reading can stop early without listing the whole tree first."""
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise FileNotFoundError(f"the standard library directory {root} does not exist")
    for directory, subdirectories, files in os.walk(root):
        subdirectories[:] = sorted(name for name in subdirectories if name not in SKIPPED_DIRECTORIES)
        for name in sorted(files):
            if name.endswith(".py"):
                yield Path(directory) / name


def is_validation_file(path: Path) -> bool:
    """About one file in 16 is held out for validation, chosen by a hash of its name (same on every peer)."""
    return zlib.crc32(path.name.encode()) % 16 == 0


def load_corpus(max_bytes: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    (train, validation): two uint8 tensors holding the text of the standard library's sources, the files
    concatenated in order until each part holds ``max_bytes`` (validation: a tenth of that).
    """
    parts = {False: bytearray(), True: bytearray()}
    limits = {False: max_bytes, True: max(max_bytes // 10, 4096)}
    for path in stdlib_source_files():
        held_out = is_validation_file(path)
        if len(parts[held_out]) >= limits[held_out]:
            if all(len(parts[key]) >= limits[key] for key in parts):
                break
            continue
        try:
            parts[held_out] += path.read_bytes() + b"\n"
        except OSError:
            continue  # unreadable file: skip it
    if not parts[False] or not parts[True]:
        raise FileNotFoundError("found too few .py files in the standard library to train on")
    train, validation = (bytes(parts[key][: limits[key]]) for key in (False, True))
    return tuple(torch.frombuffer(bytearray(part), dtype=torch.uint8) for part in (train, validation))


def sample_batch(
    corpus: torch.Tensor, batch_size: int, seq_length: int, generator: torch.Generator
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Random windows of ``seq_length + 1`` bytes: (inputs, targets) int64 tensors [batch_size, seq_length]."""
    starts = torch.randint(0, len(corpus) - seq_length - 1, (batch_size,), generator=generator)
    windows = torch.stack([corpus[start : start + seq_length + 1] for start in starts.tolist()]).long()
    return windows[:, :-1], windows[:, 1:]


@torch.no_grad()
def evaluate(model: torch.nn.Module, corpus: torch.Tensor, seq_length: int, num_batches: int = 8) -> float:
    """Mean next-byte loss (nats) on fixed windows of ``corpus``: the same windows every time, so values compare."""
    generator = torch.Generator().manual_seed(1234)
    was_training = model.training
    model.eval()
    losses = [model.loss(*sample_batch(corpus, 32, seq_length, generator)).item() for _ in range(num_batches)]
    model.train(was_training)
    return sum(losses) / len(losses)
