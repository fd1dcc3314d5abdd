"""Saving and loading the state of hosted experts.

Layout: ``<checkpoint_dir>/<uid>/checkpoint_<UTC ISO timestamp>.pt`` for every save, and a relative symlink
``<checkpoint_dir>/<uid>/checkpoint_last.pt`` to the newest one. Each file holds ``ModuleBackend.state_dict()``
(keys ``module``, ``optimizer``, ``scheduler``). Writes are atomic: a checkpoint is written to a temporary file,
flushed to disk and renamed into place, and the symlink is replaced by a rename too, so a crash at any moment leaves
either the previous or the new checkpoint, never a partial one. Only the newest ``KEEP_CHECKPOINTS`` saves of each
expert are kept (a server saves every ``update_period``: keeping them all would fill the disk within days); files
of other names in the directory are never touched.
"""

from __future__ import annotations

import os
import secrets
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import torch

from hivemind.utils.logging import get_logger

__all__ = [
    "CheckpointSaver",
    "store_experts",
    "load_experts",
    "is_directory",
    "LAST_CHECKPOINT_NAME",
    "KEEP_CHECKPOINTS",
]

logger = get_logger(__name__)

LAST_CHECKPOINT_NAME = "checkpoint_last.pt"
KEEP_CHECKPOINTS = 3  # saves kept per expert by default (the newest ones)
_TIMESTAMP_FORMAT = "%Y-%m-%dT%H:%M:%S.%f"
PathLike = Union[str, os.PathLike]


def is_directory(path: Optional[PathLike]) -> bool:
    """True if ``path`` is an existing directory (False for None, a missing path or a file)."""
    return path is not None and Path(path).is_dir()


def _require_directory(path: PathLike) -> None:
    if not is_directory(path):
        if path is not None and Path(path).exists():
            raise FileNotFoundError(f"checkpoint directory {str(path)!r} is not a directory")
        # e.g. at the first run: an empty directory starts new experts, which are saved there
        raise FileNotFoundError(f"checkpoint directory {str(path)!r} does not exist; create it (mkdir -p {path})")


def _expert_directory(checkpoint_dir: PathLike, uid: str) -> Path:
    if not uid or uid in (".", "..") or "/" in uid or os.sep in uid or "\0" in uid:
        raise ValueError(f"expert uid {uid!r} cannot be used as a checkpoint directory name")
    return Path(checkpoint_dir) / uid


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # not supported here (e.g. some platforms cannot open directories)
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _create_temporary(directory: Path) -> Tuple[int, str]:
    """A new file in ``directory`` with the permissions the umask gives, as ``open(path, "wb")`` (and hivemind 1.1.12)
    would: not mkstemp's 0600, which other users' tools that read the checkpoints could not open."""
    while True:
        temporary = str(directory / f".tmp-{os.getpid()}-{secrets.token_hex(8)}.pt")
        try:
            return os.open(
                temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666
            ), temporary
        except FileExistsError:
            continue


def _atomic_save(state: dict, path: Path) -> None:
    fd, temporary = _create_temporary(path.parent)
    try:
        with os.fdopen(fd, "wb") as file:
            torch.save(state, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise


def _atomic_symlink(target_name: str, link: Path) -> None:
    temporary = link.parent / f".tmp-link-{os.getpid()}-{threading.get_ident()}"
    try:
        os.unlink(temporary)
    except FileNotFoundError:
        pass
    os.symlink(target_name, temporary)
    os.replace(temporary, link)


def _saved_checkpoints(directory: Path) -> List[Path]:
    """The checkpoint_<timestamp>.pt files that store_experts wrote in ``directory``, oldest first."""
    found = []
    for path in directory.glob("checkpoint_*.pt"):
        try:
            datetime.strptime(path.name[len("checkpoint_") : -len(".pt")], _TIMESTAMP_FORMAT)
        except ValueError:
            continue  # checkpoint_last.pt, or a file of the user's: not ours to delete
        found.append(path)
    return sorted(found, key=lambda path: path.name)  # (the timestamps sort as text)


def _prune(directory: Path, keep: int, newest: Path) -> None:
    """Delete all but the ``keep`` last saves by name, but never ``newest`` (the one just saved, which
    checkpoint_last.pt points to): saves named after a later time (a clock set back) would otherwise outrank it."""
    older = [path for path in _saved_checkpoints(directory) if path.name != newest.name]
    for path in older[: max(len(older) - (keep - 1), 0)]:
        try:
            path.unlink()
        except OSError as e:
            logger.warning(f"Could not remove the old checkpoint {path}: {e!r}")


def store_experts(
    experts: Dict[str, object], checkpoint_dir: PathLike, keep: Optional[int] = KEEP_CHECKPOINTS
) -> None:
    """Save a checkpoint of every expert ({uid: ModuleBackend}) and point its checkpoint_last.pt at it.

    :param keep: then delete all but this many newest saves of each expert (None: keep every save)
    """
    if keep is not None and keep < 1:
        raise ValueError(f"keep must be at least 1 (the checkpoint just saved) or None, got {keep}")
    timestamp = datetime.now(timezone.utc).strftime(_TIMESTAMP_FORMAT)
    for uid, backend in experts.items():
        directory = _expert_directory(checkpoint_dir, uid)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"checkpoint_{timestamp}.pt"
        _atomic_save(backend.state_dict(), path)
        _atomic_symlink(path.name, directory / LAST_CHECKPOINT_NAME)
        _fsync_directory(directory)
        if keep is not None:
            _prune(directory, keep, newest=path)


def _what_to_do(last: Path) -> str:
    """Advice for a checkpoint_last.pt that cannot be read: restore it from the newest earlier save, if any."""
    newest = last.resolve()
    earlier = []
    for path in last.parent.glob("checkpoint_*.pt"):
        if path.name != LAST_CHECKPOINT_NAME and path.resolve() != newest and path.is_file():
            earlier.append((path.stat().st_mtime, path.name))
    start_afresh = f"remove {str(last.parent)!r} to start expert {last.parent.name} from scratch"
    if not earlier:
        return f"No earlier save of it is there: restore the file from a backup, or {start_afresh}"
    name = max(earlier)[1]  # the most recently written one
    restore = f"ln -sfn {name} {last}" if last.is_symlink() else f"cp {last.parent / name} {last}"
    return f"If the file is damaged, go back to the newest earlier save ({restore}), or {start_afresh}"


def load_experts(experts: Dict[str, object], checkpoint_dir: PathLike) -> None:
    """Load the latest checkpoint of every expert that has one; experts without one keep their state (logged)."""
    _require_directory(checkpoint_dir)
    for uid, backend in experts.items():
        path = _expert_directory(checkpoint_dir, uid) / LAST_CHECKPOINT_NAME
        if path.is_symlink() and not path.exists():  # its checkpoint was deleted: starting afresh would lose it
            raise RuntimeError(
                f"{str(path)!r} points to {os.readlink(path)!r}, which is missing; restore that file or point the "
                f"link at another checkpoint of expert {uid} (remove the link to start it from scratch)"
            )
        if not path.exists():
            logger.warning(f"No checkpoint for expert {uid} in {checkpoint_dir}; it starts from its initial state")
            continue
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise RuntimeError(
                f"could not read the checkpoint {str(path)!r} of expert {uid}: {e}. {_what_to_do(path)}"
            ) from e
        try:
            backend.load_state_dict(state)
        except Exception as e:  # e.g. saved by an expert of another class or size: the expert keeps its state
            raise RuntimeError(
                f"the checkpoint {str(path)!r} does not fit expert {uid} (saved by an expert of another class, "
                f"hidden size or optimizer?): {e}. Use the matching expert settings or another checkpoint_dir"
            ) from e


class CheckpointSaver(threading.Thread):
    """Saves checkpoints of all experts every ``update_period`` seconds until ``shutdown()`` (or ``stop.set()``).

    :param module_backends: {uid: ModuleBackend}
    :param checkpoint_dir: where to save (created if missing)
    :param update_period: seconds between saves
    """

    def __init__(self, module_backends: Dict[str, object], checkpoint_dir: PathLike, update_period: float):
        super().__init__(name="CheckpointSaver", daemon=True)
        if not update_period > 0:
            raise ValueError(f"update_period must be positive, got {update_period}")
        self.module_backends, self.checkpoint_dir, self.update_period = (
            module_backends,
            Path(checkpoint_dir),
            update_period,
        )
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(timeout=self.update_period):
            try:
                store_experts(experts=self.module_backends, checkpoint_dir=self.checkpoint_dir)
            except Exception as e:  # a full disk must not take the server down; the next period retries
                logger.warning(f"Could not save checkpoints to {self.checkpoint_dir}: {e!r}")

    def shutdown(self, timeout: float = None) -> None:
        """Stop saving (a save in progress completes) and wait for the thread."""
        self.stop.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout)
