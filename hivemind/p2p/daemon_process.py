"""The child p2pd process: start-up with readiness detection, log forwarding, exit detection and cleanup."""

import asyncio
import collections
import ipaddress
import json
import logging
import math
import multiprocessing.util
import os
import re
import subprocess
import time
import weakref
from typing import Callable, Deque, List, Optional, Sequence

from hivemind.p2p.p2p_daemon_bindings import shm_pipe
from hivemind.p2p.p2p_daemon_bindings.utils import P2PDaemonError
from hivemind.utils.asyncio import await_with_timeout
from hivemind.utils.graceful_sigterm import stopping_on_sigterm
from hivemind.utils.logging import get_logger, python_level_to_golog
from hivemind.utils.value_checks import is_number

logger = get_logger(__name__)

READY_PREFIX = "Peer ID:"
# the start-up banner (control socket, peer id, one address per line) says nothing about failures
BANNER_PREFIXES = ("Control socket:", READY_PREFIX, "Peer Addrs:", "Bootstrap peers:", "/")
# plain (non-JSON) lines that report a failure: start-up errors, Go panics and fatal runtime errors
PLAIN_ERROR_PREFIXES = ("p2pd: error", "panic:", "fatal error:")
OUTPUT_TAIL_LINES = 20
OUTPUT_LINE_LIMIT = 2**20
TERMINATE_GRACE_SECONDS = 2.0
GOLOG_ERROR_LEVELS = ("error", "dpanic", "panic", "fatal")

# p2pd's flags named in its start-up errors -> the P2P.create / DHT options the user actually passed
OPTION_OF_FLAG = {
    "hostAddrs": "host_maddrs",
    "announceAddrs": "announce_maddrs",
    "bootstrapPeers": "initial_peers",
    "trustedRelays": "trusted_relays",
    "idleTimeout": "idle_timeout",
    "persistentConnMaxMsgSize": "persistent_conn_max_msg_size",
    "relayHopLimit": "relay_hop_limit",
    "id": "identity_path",
    "relay": "use_relay",
    "autoRelay": "use_auto_relay",
}
_FLAG_PATTERN = re.compile(r"(?<![\w-])-(" + "|".join(OPTION_OF_FLAG) + r")\b(=[01]\b)?")


_BOOLEAN_FLAGS = ("relay", "autoRelay")


def _option_for_flag(match: "re.Match[str]") -> str:
    """``-autoRelay=1`` -> ``use_auto_relay=True``: the option, and a boolean's value, as the user passes them."""
    flag, value = match.group(1), match.group(2) or ""
    if value and flag in _BOOLEAN_FLAGS:
        value = f"={value == '=1'}"
    return OPTION_OF_FLAG[flag] + value


_STANDARD_LEVELS = (logging.CRITICAL, logging.ERROR, logging.WARNING, logging.INFO, logging.DEBUG)


def golog_level_for(python_level: int) -> str:
    """The GOLOG_LOG_LEVEL matching a Python logging level (rounded down to a standard level; WARNING→WARN)."""
    standard_level = next((level for level in _STANDARD_LEVELS if python_level >= level), logging.DEBUG)
    return python_level_to_golog(standard_level)


_INVALID_LISTEN_MADDR = re.compile(r'invalid multiaddr "([^"]*)" in (host_maddrs|announce_maddrs)\b')
_HOST_AND_PORT = re.compile(r"\[?([^\[\]]+?)\]?:(\d{1,5})")


def _multiaddr_for(given: str) -> str:
    """The multiaddr of a host:port, [ipv6]:port or bare IP written as such (port 0: any), else an example one."""
    text = re.sub(r"^/ip[46]/", "", given.strip())  # (e.g. /ip4/127.0.0.1:5000)
    host, port = text, "0"  # a bare IP (an IPv6 one without brackets has colons of its own)
    match = _HOST_AND_PORT.fullmatch(text)
    if match is not None and (text.startswith("[") or ":" not in match.group(1)):
        host, port = match.groups()
    try:
        ip = ipaddress.ip_address("127.0.0.1" if host == "localhost" else host)
    except ValueError:
        ip = None
    if ip is None or int(port) > 65535:
        return "/ip4/0.0.0.0/tcp/31337"
    return f"/ip{ip.version}/{ip}/tcp/{port}"


def _with_multiaddr_example(text: str) -> str:
    """p2pd's 'invalid multiaddr "127.0.0.1:5000" in host_maddrs' plus the form to write (here /ip4/.../tcp/5000)."""
    match = _INVALID_LISTEN_MADDR.search(text)
    if match is None:
        return text
    given, option = match.groups()
    return f"{text}; {option} takes multiaddrs such as {_multiaddr_for(given)}"


def describe_output_line(line: str) -> str:
    """A short human-readable form of one output line (golog JSON lines become ``msg: error``)."""
    record = _parse_json_line(line)
    if record is None:
        return _with_multiaddr_example(_FLAG_PATTERN.sub(_option_for_flag, line))
    text = str(record.get("msg", line))
    details = [f"{key}={record[key]}" for key in ("error", "err", "addr") if key in record]
    return f"{text} ({', '.join(details)})" if details else text


def _parse_json_line(line: str) -> Optional[dict]:
    if not line.startswith("{"):
        return None
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def remove_socket_file(path: str, owner_pid: int) -> None:
    """Remove a socket file of process ``owner_pid`` (nothing in a forked child that inherited its owner)."""
    if os.getpid() == owner_pid:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def remove_socket_file_with(owner: object, path: str) -> None:
    """Remove the socket file at ``path`` of this process when ``owner`` is garbage-collected or the process exits,
    also a forked process (e.g. a DataLoader worker): it ends with os._exit, which runs only multiprocessing's own
    finalizers, not the interpreter's exit hooks."""
    weakref.finalize(owner, remove_socket_file, path, os.getpid())
    multiprocessing.util.Finalize(owner, remove_socket_file, args=(path, os.getpid()), exitpriority=0)


def _terminate_sync(popen: subprocess.Popen, paths: Sequence[str], owner_pid: int) -> None:
    """Kill the daemon and remove its socket files; safe to call at interpreter exit (no event loop needed)."""
    if os.getpid() != owner_pid:
        return  # a forked child inherited this object; the daemon belongs to the parent
    if popen.poll() is None:
        popen.terminate()
        try:
            popen.wait(TERMINATE_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.wait()
    for stream in (popen.stdout,):
        if stream is not None:
            try:
                stream.close()
            except OSError:
                pass
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
    shm_pipe.remove_daemon_pipe_files(popen.pid)


class _OutputProtocol(asyncio.StreamReaderProtocol):
    """Reads p2pd's output; ``closed`` is done once the transport let go of the pipe (connection_lost)."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        super().__init__(reader)
        self.closed = asyncio.get_running_loop().create_future()

    def connection_lost(self, exc: Optional[Exception]) -> None:
        super().connection_lost(exc)
        if not self.closed.done():
            self.closed.set_result(None)


class DaemonProcess:
    """Runs p2pd as a child process; forwards its output to ``logger`` and reports how and why it exited."""

    def __init__(self, binary_path: str, args: List[str], *, env: dict, cleanup_paths: Sequence[str] = ()) -> None:
        self.binary_path, self.args, self.env = binary_path, args, env
        self.cleanup_paths = list(cleanup_paths)
        self._popen: Optional[subprocess.Popen] = None
        self._output_tail: Deque[str] = collections.deque(maxlen=OUTPUT_TAIL_LINES)
        self._reader_task: Optional[asyncio.Task] = None
        self._transport: Optional[asyncio.BaseTransport] = None
        self._output_protocol: Optional[_OutputProtocol] = None
        self._ready: Optional[asyncio.Future] = None
        self._exited: Optional[asyncio.Event] = None
        self._finalizer: Optional[weakref.finalize] = None
        self.peer_id_text: Optional[str] = None
        self.on_unexpected_exit: Optional[Callable[[P2PDaemonError], None]] = None
        self._stopping = False

    @property
    def pid(self) -> Optional[int]:
        return None if self._popen is None else self._popen.pid

    @property
    def returncode(self) -> Optional[int]:
        return None if self._popen is None else self._popen.poll()

    @property
    def is_running(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    def output_tail(self) -> str:
        """The last lines p2pd printed, in a short form (for error messages)."""
        return "; ".join(describe_output_line(line) for line in self._output_tail)

    def exit_description(self) -> str:
        code = self.returncode
        status = "is still running" if code is None else f"exited with code {code}"
        tail = self.output_tail()
        return f"p2pd {status}" + (f": {tail}" if tail else "")

    async def start(self, startup_timeout: float) -> None:
        """Start p2pd and wait until it prints its peer id; on failure the error quotes p2pd's own output."""
        if not is_number(startup_timeout):
            raise TypeError(f"startup_timeout must be a number of seconds, got {startup_timeout!r}")
        if math.isnan(startup_timeout):
            raise ValueError("startup_timeout must be a number of seconds, got NaN")
        loop = asyncio.get_running_loop()
        self._ready = loop.create_future()
        self._exited = asyncio.Event()
        try:
            self._popen = subprocess.Popen(
                [self.binary_path, *self.args],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                # it exits once this process has ended, also while a process forked from it holds the socket
                env=dict(self.env, HIVEMIND_P2PD_PARENT_PID=str(os.getpid())),
            )
        except OSError as e:
            raise P2PDaemonError(f"Cannot start p2pd from {self.binary_path}: {e}") from e
        # if the owner forgets shutdown(), the daemon and its sockets still go away at garbage collection / exit
        self._finalizer = weakref.finalize(self, _terminate_sync, self._popen, self.cleanup_paths, os.getpid())

        reader = asyncio.StreamReader(limit=OUTPUT_LINE_LIMIT)
        self._transport, self._output_protocol = await loop.connect_read_pipe(
            lambda: _OutputProtocol(reader), self._popen.stdout
        )
        self._reader_task = asyncio.create_task(self._read_output(reader))
        exited_waiter = asyncio.create_task(self._exited.wait())
        try:
            await asyncio.wait({self._ready, exited_waiter}, timeout=startup_timeout, return_when="FIRST_COMPLETED")
        finally:
            exited_waiter.cancel()
            await asyncio.gather(exited_waiter, return_exceptions=True)
        if self._ready.done():
            return
        if self._exited.is_set():
            await self.stop()
            raise P2PDaemonError(f"p2pd failed to start: {self.exit_description()}")
        tail = self.output_tail()
        await self.stop()
        raise P2PDaemonError(
            f"p2pd did not report its peer id within startup_timeout={startup_timeout} s"
            + (f"; its output: {tail}" if tail else "; it printed nothing")
        )

    async def _read_output(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                try:
                    raw_line = await reader.readline()
                except ValueError:  # a line longer than OUTPUT_LINE_LIMIT
                    raw_line = (await reader.read(OUTPUT_LINE_LIMIT)) + b"\n"
                if not raw_line:
                    break
                self._on_line(raw_line.decode(errors="replace").rstrip("\r\n"))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # pragma: no cover - reading a pipe should not fail
            logger.debug(f"Stopped reading p2pd output: {e!r}")
        await self._wait_reaped()
        self._exited.set()
        if not self._stopping:
            error = P2PDaemonError(self.exit_description())
            if self._ready.done() and not stopping_on_sigterm():
                logger.error(f"p2pd stopped unexpectedly: {error}")
            elif self._ready.done():  # the same SIGTERM reached p2pd and this process: a shutdown, not a failure
                logger.debug(f"p2pd stopped by the SIGTERM that stops this process: {error}")
            if self.on_unexpected_exit is not None:
                self.on_unexpected_exit(error)

    def _on_line(self, line: str) -> None:
        if not line:
            return
        if self._ready is not None and not self._ready.done() and line.startswith(READY_PREFIX):
            self.peer_id_text = line[len(READY_PREFIX) :].strip()
            self._ready.set_result(None)
        record = _parse_json_line(line)
        level = None if record is None else str(record.get("level", "")).lower()
        if level in GOLOG_ERROR_LEVELS or record is None and line.lower().startswith(PLAIN_ERROR_PREFIXES):
            self._output_tail.append(line)
            logger.error(f"p2pd: {describe_output_line(line)}")
        else:
            if record is None and not line.startswith(BANNER_PREFIXES):
                self._output_tail.append(line)  # plain lines carry fatal errors (flag parsing, log.Fatal, panics)
            logger.debug(f"p2pd: {line}")

    async def _wait_reaped(self, timeout: float = 1.0) -> None:
        """Output EOF means the process is exiting; give the kernel a moment to make its exit code available."""
        deadline = time.monotonic() + timeout
        while self._popen.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.005)

    async def wait_exited(self, timeout: Optional[float] = None) -> bool:
        """Wait until p2pd's output closes and its exit code is known; returns False on timeout."""
        if self._exited is None:
            return True
        try:
            await await_with_timeout(self._exited.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    def expect_exit(self) -> None:
        """From now on, p2pd exiting is part of a shutdown, not a failure to report."""
        self._stopping = True

    async def stop(self) -> None:
        """Terminate p2pd (SIGTERM, then SIGKILL after a grace period), reap it and remove its socket files."""
        self._stopping = True
        if self._popen is None:
            return
        if self._popen.poll() is None:
            self._popen.terminate()
            deadline = time.monotonic() + TERMINATE_GRACE_SECONDS
            while self._popen.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            if self._popen.poll() is None:
                self._popen.kill()
                while self._popen.poll() is None:
                    await asyncio.sleep(0.01)
        if self._reader_task is not None:
            try:
                await await_with_timeout(asyncio.shield(self._reader_task), 1)
            except (asyncio.TimeoutError, asyncio.CancelledError):
                self._reader_task.cancel()
                await asyncio.gather(self._reader_task, return_exceptions=True)
        if self._transport is not None:
            self._transport.close()
            # uvloop closes the pipe a loop iteration later and aborts the process if its file descriptor was closed
            # (and reused) by then: the finalizer below closes popen.stdout only once the transport let go of it
            try:
                await await_with_timeout(asyncio.shield(self._output_protocol.closed), 1)
            except asyncio.TimeoutError:
                logger.debug("p2pd's output pipe did not close within 1 s")
        if self._finalizer is not None:
            self._finalizer()  # reaps nothing new, closes the pipe and removes socket files
