"""Output memory of all-reduce rounds, reused from one round to the next.

Each round writes its results (one delta per averaged tensor) into memory as large as the averaged tensors. Fresh
memory of that size is mapped anew every round, and the kernel zero-fills every page at the first write: for large
tensors that costs more than the arithmetic written into it. :class:`ReusableOutputs` keeps the memory of the last
round's outputs and hands it out again once nothing else references it any more: the caller dropped the deltas
after adding them to its tensors. An output that the caller still holds (even through a view or a NumPy array) is
never reused; the round then gets fresh memory, which replaces the held one in the pool. Holding its storage object
(``delta.untyped_storage()``, ``delta.storage()``) counts as holding it too. An output moved into shared memory (for
example sent to another process through ``torch.multiprocessing``) may be read by a process that the pool cannot
see: it is dropped from the pool and never handed out again.

The pool keeps at most one buffer per averaged tensor, so it holds at most one vector's worth of memory (only
buffers of at least ``min_bytes``; smaller ones come from the allocator's warm free lists anyway).
"""

from __future__ import annotations

import sys
from typing import Callable, Dict, Optional, Tuple

import torch

from hivemind.compression.buffers import empty_output

__all__ = ["ReusableOutputs", "storage_used_once"]

DEFAULT_MIN_BYTES = 1 << 20

# a storage referenced by one tensor object reports this use count when asked through its storage object
_EXCLUSIVE_USE_COUNT = 2
_use_count: Optional[Callable[[int], int]] = getattr(torch._C, "_storage_Use_Count", None)


def storage_used_once(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is the only tensor on its storage (no views, detached aliases or other tensors share it);
    False where this torch cannot tell."""
    return _use_count is not None and _use_count(tensor.untyped_storage()._cdata) <= _EXCLUSIVE_USE_COUNT


def _storage_references(tensor: torch.Tensor) -> int:
    """Python references to the storage object of ``tensor`` (torch keeps one such object per storage): compared
    with the count measured the same way when the pool allocated it, more means that someone else keeps it."""
    storage = tensor.untyped_storage()
    return sys.getrefcount(storage)


def _unreferenced(tensor: torch.Tensor, storage_references: int) -> bool:
    """Whether the pool's tensor is the only user of its memory (no views, no NumPy arrays, no other tensors, no
    storage objects kept by a caller) and that memory is private to this process (not shared with another one).

    :param storage_references: what :func:`_storage_references` returned for the tensor when it was allocated
    """
    if tensor.untyped_storage().is_shared():
        return False
    return storage_used_once(tensor) and _storage_references(tensor) <= storage_references


class ReusableOutputs:
    """Flat output tensors for all-reduce rounds over the same tensors, one slot per averaged tensor.

    :param min_bytes: outputs smaller than this are allocated fresh each time and not kept
    """

    def __init__(self, min_bytes: int = DEFAULT_MIN_BYTES):
        self.min_bytes = min_bytes
        self._slots: Dict[int, Tuple[torch.Tensor, int]] = {}  # slot -> (buffer, its storage references when new)
        self.reused = self.allocated = 0  # outputs of at least min_bytes handed out again / allocated

    def take(self, slot: int, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A flat CPU tensor of ``numel`` elements of ``dtype`` with undefined contents, for the output of the
        averaged tensor number ``slot``."""
        if numel * torch.empty((), dtype=dtype).element_size() < self.min_bytes or _use_count is None:
            return empty_output(numel, dtype)
        kept, references = self._slots.pop(slot, (None, 0))
        if kept is not None and kept.dtype == dtype and kept.numel() == numel and _unreferenced(kept, references):
            self.reused += 1
        else:  # a buffer still in use (or shared with another process) is left to its users: fresh memory
            kept = empty_output(numel, dtype)
            references = _storage_references(kept)
            self.allocated += 1
        self._slots[slot] = (kept, references)
        return kept.detach()  # another tensor on the same memory: while it (or anything made from it) lives, the
        # memory counts as referenced

    @property
    def nbytes(self) -> int:
        """Bytes of the buffers kept (some of them may be in use by a caller now)."""
        return sum(tensor.numel() * tensor.element_size() for tensor, _ in self._slots.values())

    def clear(self) -> None:
        """Forget every kept buffer (memory still referenced elsewhere is freed with its last reference)."""
        self._slots.clear()
