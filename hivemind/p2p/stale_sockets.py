"""Remove the Unix socket files that killed hivemind processes left behind.

A process that exits normally removes its own sockets (p2pd's control socket, the client's callback socket, the DHT
process's socket). A process killed with SIGKILL runs no cleanup, so its files stay in the temporary directory
forever. ``sweep_stale_files`` runs when a ``P2P`` starts and removes such leftovers, and nothing else:

- only names of our own patterns, only in the directories we use, only files of the current user;
- a socket goes only if nobody listens on it (it is not bound in ``/proc/net/unix``, and a connect attempt is refused)
  and its owner is gone: the pid in its name is dead, or (names without a pid, pid reuse) it is older than
  ``GRACE_SECONDS``, far longer than a starting process takes from binding a socket to listening on it.

Several peers may sweep at once: a file that another one removed first is simply skipped. The shared-memory pipe
files of killed daemons are p2pd's own to remove: every p2pd sweeps them when it starts.
"""

import os
import re
import socket
import stat
import tempfile
import time
from typing import Iterable, Optional, Set

from hivemind.utils.logging import get_logger

logger = get_logger(__name__)

_SOCKET_NAME = re.compile(r"^hivemind-(?:p2pd|p2pclient|dht)-.*\.sock$")  # p2pd, client callback, DHT process
P2P_SOCKET_DIR = "/tmp"  # where P2P puts p2pd's control socket and the client's callback socket
GRACE_SECONDS = 60.0  # a socket whose owner may be alive is left alone for this long after it was created
_OWNER_PID = re.compile(r"^hivemind-(?:p2pd|p2pclient|dht)-(\d+)_")


def owner_pid(name: str) -> Optional[int]:
    """The pid of the process that created the socket named ``name``, if its name carries one."""
    match = _OWNER_PID.match(name)
    return int(match.group(1)) if match else None


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (one of another user counts as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _bound_unix_paths() -> Optional[Set[str]]:
    """Paths of the Unix sockets bound in this network namespace (Linux), or None where that cannot be read."""
    try:
        with open("/proc/net/unix") as table:
            lines = table.readlines()[1:]
    except OSError:
        return None
    return {fields[7] for fields in (line.split() for line in lines) if len(fields) >= 8}


def _connect_refused(path: str) -> bool:
    """True iff connecting to the socket file fails with ECONNREFUSED (nobody listens); never blocks."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        return True
    except OSError:
        return False  # EAGAIN (a full backlog: someone listens), ENOENT (already removed), ...
    finally:
        probe.close()
    return False


def _is_stale_socket(path: str, bound: Optional[Set[str]], now: float) -> bool:
    try:
        info = os.lstat(path)
    except OSError:
        return False
    if info.st_uid != os.getuid() or not stat.S_ISSOCK(info.st_mode):
        return False
    pid = owner_pid(os.path.basename(path))
    if (pid is None or pid_alive(pid)) and now - info.st_mtime < GRACE_SECONDS:
        return False
    if bound is not None and path in bound:
        return False
    return _connect_refused(path)


def sweep_stale_sockets(directories: Iterable[str]) -> int:
    """Remove our stale socket files in these directories; returns how many were removed."""
    removed, now, bound = 0, time.time(), _bound_unix_paths()
    for directory in dict.fromkeys(os.path.abspath(d) for d in directories):
        try:
            names = os.listdir(directory)
        except OSError:
            continue
        for name in names:
            if _SOCKET_NAME.match(name) and _is_stale_socket(os.path.join(directory, name), bound, now):
                try:
                    os.unlink(os.path.join(directory, name))
                    removed += 1
                except OSError:
                    pass  # another starting peer removed it first, or it is not ours to remove
    return removed


def sweep_stale_files() -> None:
    """Remove what killed peers left behind (see the module docstring); never raises."""
    try:
        sockets = sweep_stale_sockets([P2P_SOCKET_DIR, tempfile.gettempdir()])
    except Exception as e:  # a sweep is housekeeping: it must never stop a peer from starting
        logger.debug(f"Sweeping stale socket files failed: {e!r}")
        return
    if sockets:
        logger.debug(f"Removed {sockets} stale socket files of killed hivemind processes")
