"""Keep glibc's allocator from handing megabyte-sized buffers back to the kernel after every message.

Each large message that crosses a P2P stream allocates a few buffers of its size (the serialized bytes, the parsed
message, the received payload) and frees them a moment later. With glibc's start-up thresholds, a freed buffer at
the top of the heap is returned to the kernel once more than about twice its size is free there, so the next
message faults the same pages in again and zero-fills them: in a 1 MiB-message stream that was a third of the
Python process's CPU time. glibc raises these thresholds by itself after it frees a large block, up to 32 MiB for
allocations served by ``mmap`` and 64 MiB for trimming; ``tune_malloc_for_large_messages`` sets that ceiling at
once, so at most 64 MiB of freed memory stays at the top of the heap, as in any process that has freed one
32 MiB buffer.

The tuning applies to the whole process, once, on glibc only, so the library applies it only in processes it owns:
the DHT process calls ``tune_malloc_for_large_messages``. Elsewhere (a user's training process, which MoE clients
and averagers share) it is opt-in: ``P2P.create(tune_malloc=True)`` / ``P2P.replicate(..., tune_malloc=True)``,
or ``HIVEMIND_TUNE_MALLOC=1`` for every ``P2P`` of the process. It is never applied when ``HIVEMIND_TUNE_MALLOC=0``
or when the user already set ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` for glibc.
"""

import ctypes
import os
import platform
from typing import Optional

from hivemind.utils.logging import get_logger

logger = get_logger(__name__)

TUNE_MALLOC_ENV_VAR = "HIVEMIND_TUNE_MALLOC"
GLIBC_ENV_VARS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, from glibc's malloc.h
MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit systems
TRIM_THRESHOLD_BYTES = 2 * MMAP_THRESHOLD_BYTES  # what glibc pairs with that mmap threshold
_THRESHOLDS = ((M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES), (M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))

_applied: Optional[bool] = None  # set by the first call; a forked child inherits both this and glibc's settings


def tune_malloc_for_large_messages() -> bool:
    """Apply the thresholds described in the module docstring once per process; returns whether they are in effect."""
    global _applied
    if _applied is None:
        _applied = _apply()  # two threads racing here both call mallopt with the same values: harmless
    return _applied


def tune_malloc_if_requested(requested: Optional[bool]) -> bool:
    """Tune if ``requested`` is True, or if it is None and ``HIVEMIND_TUNE_MALLOC=1``; returns whether tuned."""
    if requested is None:
        requested = _env_setting() is True
    return tune_malloc_for_large_messages() if requested else bool(_applied)


def _env_setting() -> Optional[bool]:
    """``HIVEMIND_TUNE_MALLOC``: True for 1/true/yes/on, False for 0/false/no/off, None when unset or other."""
    value = os.environ.get(TUNE_MALLOC_ENV_VAR, "").strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    return None


def _apply() -> bool:
    if _env_setting() is False:
        return False
    if any(name in os.environ for name in GLIBC_ENV_VARS):
        return False  # the user tuned glibc explicitly
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    applied = all(mallopt(param, value) == 1 for param, value in _THRESHOLDS)  # mallopt returns 1 on success
    if applied:
        logger.debug(f"glibc malloc: mmap threshold {MMAP_THRESHOLD_BYTES} B, trim threshold {TRIM_THRESHOLD_BYTES} B")
    return applied
