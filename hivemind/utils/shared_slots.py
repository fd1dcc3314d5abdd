"""Shared-memory slots of MPFutures: 64 bytes per future in a segment owned by the process that created it.

A slot holds the future's uid (so that a reader can tell a freed or reused slot from its own), its state code
(mirrored by the origin after every transition) and six 8-byte cells for subclasses. Segments are memfds on Linux
(opened by other processes of the same user through /proc/<pid>/fd/<fd>, gone when the origin exits) and temporary
files elsewhere. 8-byte aligned loads and stores are single instructions, so readers never see a torn value.
"""

import array
import collections
import mmap
import os
import tempfile
import threading
from typing import Deque, Dict, Optional

__all__ = ["SLOT_SIZE", "SHARED_CELLS", "Segment", "SharedSlot", "open_segment", "forget_segments_of"]


SLOT_SIZE = 64  # bytes per future: uid (int64) | state code (int64) | six 8-byte cells for subclasses
SHARED_CELLS = 6
_WORDS = SLOT_SIZE // 8
_SLOTS_PER_SEGMENT = 1024
_SEGMENT_SIZE = SLOT_SIZE * _SLOTS_PER_SEGMENT
_FREE_UID = -1


class Mapping:
    """One segment mapped into this process, seen as int64 words and as float64 words."""

    def __init__(self, fd: int, owner_pid: Optional[int]):
        raw = memoryview(mmap.mmap(fd, _SEGMENT_SIZE))  # (the mmap keeps a duplicate of fd while it lives)
        self.ints, self.floats = raw.cast("q"), raw.cast("d")
        self.owner_pid = owner_pid  # the process whose futures live in it


class Segment:
    """Shared-memory slots of the futures of one origin (a memfd on Linux, a temporary file elsewhere)."""

    def __init__(self):
        self._tempfile = None
        if hasattr(os, "memfd_create"):
            self._fd = os.memfd_create("hivemind-mpfuture", os.MFD_CLOEXEC)
            self.path = f"/proc/{os.getpid()}/fd/{self._fd}"  # other processes of this user open it there
        else:
            self._fd, self._tempfile = tempfile.mkstemp(prefix="hivemind-mpf-slots-")
            self.path = self._tempfile
        os.ftruncate(self._fd, _SEGMENT_SIZE)
        self.mapping = Mapping(self._fd, os.getpid())
        self.mapping.ints[:] = array.array("q", [_FREE_UID]) * len(self.mapping.ints)
        self._free = list(range(_SLOTS_PER_SEGMENT - 1, -1, -1))
        self._released: Deque[int] = collections.deque()  # freed slots not yet moved back to _free
        self._lock = threading.Lock()
        mapped_segments[self.path] = self.mapping

    def allocate(self, uid: int) -> Optional[int]:
        """A slot for future ``uid``, or None if the segment is full."""
        with self._lock:
            return self._allocate(uid)

    def _allocate(self, uid: int) -> Optional[int]:
        while self._released:  # slots freed by release() since the last allocation
            self._free.append(self._released.popleft())
        if not self._free:
            return None
        slot = self._free.pop()
        words = self.mapping.ints
        words[slot * _WORDS + 1 : (slot + 1) * _WORDS] = array.array("q", [0]) * (_WORDS - 1)
        words[slot * _WORDS] = uid
        return slot

    def release(self, slot: int, owner_pid: int) -> None:
        if os.getpid() != owner_pid:
            return  # a forked child collecting its copy of a parent's future: the slot is still the parent's
        # no lock here: this runs from the garbage collector, which may interrupt allocate() in this very thread while
        # it holds the lock (a non-reentrant lock deadlocked the thread, and every later MPFuture of the process
        # waited behind it); the store is one aligned 8-byte write and deque.append is atomic
        self.mapping.ints[slot * _WORDS] = _FREE_UID
        self._released.append(slot)

    def close(self) -> None:
        if self._tempfile is not None:
            try:
                os.unlink(self._tempfile)
            except OSError:
                pass


# path -> segment mapped in this process; a mapping stays valid in forked children, so the cache is kept at fork
mapped_segments: Dict[str, Mapping] = {}


def open_segment(path: str, owner_pid: Optional[int] = None) -> Optional[Mapping]:
    """The segment of process ``owner_pid`` at ``path``, mapped in this process (cached), or None if it is gone."""
    mapping = mapped_segments.get(path)
    if mapping is None:
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError:
            return None  # the origin exited: its futures can no longer be observed
        try:
            mapping = Mapping(fd, owner_pid)
        except (OSError, ValueError):
            return None
        finally:
            os.close(fd)
        mapped_segments[path] = mapping
    return mapping


def forget_segments_of(pid: int) -> None:
    """Drop the cached mappings of the segments of process ``pid``, which has exited: each held a descriptor and its
    memory for as long as this process lived (and a later process given the same pid would have found them under
    its own paths). Slots of its futures still held here keep their mapping until those futures go."""
    for path, mapping in list(mapped_segments.items()):
        if mapping.owner_pid == pid:
            mapped_segments.pop(path, None)


class SharedSlot:
    """The 64 bytes of one future in its origin's segment; cells are for subclasses (``MPFuture._shared``)."""

    __slots__ = ("_ints", "_floats", "_base", "uid")

    def __init__(self, mapping: Mapping, slot: int, uid: int):
        self._ints, self._floats, self._base, self.uid = mapping.ints, mapping.floats, slot * _WORDS, uid

    @property
    def alive(self) -> bool:
        """False once the origin dropped the future (its slot was freed and perhaps reused)."""
        return self._ints[self._base] == self.uid

    def get_state_code(self) -> int:
        return self._ints[self._base + 1]

    def set_state_code(self, code: int) -> None:
        self._ints[self._base + 1] = code

    def get_float(self, cell: int) -> float:
        return self._floats[self._base + 2 + cell]

    def set_float(self, cell: int, value: float) -> None:
        if self.alive:
            self._floats[self._base + 2 + cell] = value

    def get_int(self, cell: int) -> int:
        return self._ints[self._base + 2 + cell]

    def set_int(self, cell: int, value: int) -> None:
        if self.alive:
            self._ints[self._base + 2 + cell] = value
