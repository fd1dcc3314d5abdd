"""Runs peers of the ORIGINAL hivemind 1.1.12 and of OURS as separate, bounded subprocesses on 127.0.0.1.

Both libraries are called `hivemind`, so each runs in its own interpreter: ours with the test interpreter (or
HIVEMIND_OURS_PYTHON) and the repository on PYTHONPATH, the original with the environment that
tests/interop/setup_original_env.sh creates under .interop/ (never the repository on sys.path). Every process
reports which implementation it loaded and the harness asserts it. This module never imports either `hivemind`.

Every subprocess (with its children: DHT processes, p2pd daemons) is killed when closed, on timeouts, and at exit.
"""

import atexit
import json
import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

try:
    import psutil
except ImportError:  # pragma: no cover - psutil is a dev requirement; process groups still cover most cases
    psutil = None

REPO = Path(__file__).resolve().parents[2]
INTEROP_DIR = Path(os.environ.get("HIVEMIND_INTEROP_DIR", REPO / ".interop")).resolve()
ORIGINAL_VENV = INTEROP_DIR / "venv"
ORIGINAL_PYTHON = ORIGINAL_VENV / "bin" / "python"
ORIGINAL_VERSION = "1.1.12"
SETUP_SCRIPT = Path(__file__).resolve().with_name("setup_original_env.sh")
DRIVER = Path(__file__).resolve().with_name("peer_driver.py")
IMPLEMENTATIONS = ("original", "ours")


def ours_python() -> str:
    return os.environ.get("HIVEMIND_OURS_PYTHON", sys.executable)


class HarnessError(RuntimeError):
    """A peer process misbehaved: did not start, loaded the wrong library, timed out or died."""


class RemoteError(RuntimeError):
    """A driver command raised inside the peer process; `error_type` is the exception class name there."""

    def __init__(self, peer_name: str, cmd: str, error_type: str, message: str):
        super().__init__(f"{peer_name}: {cmd} raised {error_type}: {message}")
        self.error_type, self.message = error_type, message


# --- the original's environment ---


def original_env_problem() -> Optional[str]:
    """None if the original's environment is ready, else why not."""
    stamp = INTEROP_DIR / "ready.stamp"
    if not ORIGINAL_PYTHON.exists() or not stamp.exists():
        return f"the original hivemind {ORIGINAL_VERSION} environment does not exist at {ORIGINAL_VENV}"
    return None


def ensure_original_env(timeout: float = 900) -> Optional[str]:
    """Creates the original's environment if needed (cached, shared by parallel workers through a file lock).

    Returns None when it is ready, otherwise the reason it could not be created (e.g. the registry is unreachable).
    """
    if original_env_problem() is None:
        return None
    try:
        proc = subprocess.run(
            ["bash", str(SETUP_SCRIPT)], capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired:
        return f"{SETUP_SCRIPT} did not finish within {timeout} s"
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        return f"could not create the original hivemind {ORIGINAL_VERSION} environment ({SETUP_SCRIPT}):\n{tail}"
    return original_env_problem()


def python_command(implementation: str) -> List[str]:
    """Interpreter command line (without the script) that imports the given implementation of `hivemind`."""
    if implementation == "ours":
        return [ours_python()]
    if implementation == "original":
        return [str(ORIGINAL_PYTHON), "-s"]
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")


def process_env(implementation: str, extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """Environment for a subprocess of `implementation`: only that implementation can be imported there."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env.update(PYTHONNOUSERSITE="1", PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore", HIVEMIND_COLORS="0")
    if implementation == "ours":
        env["PYTHONPATH"] = str(REPO)
    env.update(extra or {})
    return env


def run_original_script(script: str, directory: Path, timeout: float = 60, prelude: str = "") -> str:
    """Run `prelude` + dedented `script` under the original hivemind in `directory` (also its argv[1]); return stdout.

    The directory is the working directory too, so that only the original's hivemind can be imported there.
    """
    proc = subprocess.run(
        [*python_command("original"), "-c", prelude + textwrap.dedent(script), str(directory)],
        cwd=directory,
        env=process_env("original"),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def to_hex(tensor) -> str:
    """A tensor as the hex of its float32 bytes: how the drivers exchange tensors over their JSON pipes."""
    return tensor.detach().float().contiguous().numpy().tobytes().hex()


def linear_parameters(result: dict, names=("weight", "bias")):
    """The float32 parameters a driver reported for a Linear model, as one flat numpy array."""
    import numpy as np

    return np.concatenate([np.frombuffer(bytes.fromhex(result[name]), dtype=np.float32) for name in names])


def check_implementation(implementation: str, version: str, file: str) -> None:
    """Asserts that a process reporting `hivemind.__version__`/`__file__` loaded the expected implementation."""
    file = os.path.realpath(file)
    if implementation == "original":
        ok = version == ORIGINAL_VERSION and file.startswith(os.path.realpath(ORIGINAL_VENV) + os.sep)
    else:
        ok = version != ORIGINAL_VERSION and file.startswith(os.path.realpath(REPO / "hivemind") + os.sep)
    if not ok:
        raise HarnessError(f"expected the {implementation} hivemind, but the process loaded {version} from {file}")


# --- process lifetime ---

_live_processes: "set[subprocess.Popen]" = set()
_live_lock = threading.Lock()


def process_tree(proc: subprocess.Popen) -> list:
    """`proc` and its descendants as psutil processes (empty if it is gone or psutil is missing)."""
    if psutil is None or proc.returncode is not None:
        return []
    try:
        root = psutil.Process(proc.pid)
        return [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def kill_tree(proc: subprocess.Popen, grace: float = 3.0, known_members: Sequence = ()) -> None:
    """Terminates `proc` and every descendant (DHT processes, p2pd daemons), then kills what is left.

    `known_members`: descendants listed earlier, e.g. before a graceful shutdown let `proc` exit and orphan them.
    """
    members = list({m.pid: m for m in [*known_members, *process_tree(proc)]}.values())
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if proc.returncode is None:  # not reaped yet, so its pid (the group id) cannot belong to anyone else
            try:
                os.killpg(proc.pid, sig)  # started with start_new_session=True: pgid == pid
            except (ProcessLookupError, PermissionError):
                pass
        # members were listed while alive; psutil checks for pid reuse before signalling
        for member in members:
            try:
                member.send_signal(sig)
            except Exception:  # already gone or reused: nothing to do
                pass
        deadline = time.monotonic() + grace
        alive = [m for m in members if _is_running(m)]
        while (alive or proc.poll() is None) and time.monotonic() < deadline:
            time.sleep(0.05)
            alive = [m for m in alive if _is_running(m)]
        if not alive and proc.poll() is not None:
            break
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    with _live_lock:
        _live_processes.discard(proc)


def _is_running(member) -> bool:
    try:
        return member.is_running() and member.status() != psutil.STATUS_ZOMBIE
    except Exception:
        return False


@atexit.register
def _kill_all_at_exit():
    with _live_lock:
        procs = list(_live_processes)
    for proc in procs:
        kill_tree(proc, grace=1.0)


def _spawn(cmd: Sequence[str], implementation: str, log_path: Path, extra_env=None, stdin=None, stdout=None):
    log = open(log_path, "ab")
    try:
        proc = subprocess.Popen(
            list(cmd),
            stdin=stdin,
            stdout=stdout if stdout is not None else log,
            stderr=log,
            cwd=tempfile.gettempdir(),  # never a directory holding a `hivemind` package
            env=process_env(implementation, extra_env),
            start_new_session=True,
        )
    finally:
        log.close()
    with _live_lock:
        _live_processes.add(proc)
    return proc


def _log_tail(log_path: Path, lines: int = 40) -> str:
    try:
        text = log_path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


# --- a driven peer ---


class PeerProcess:
    """One interpreter running tests/interop/peer_driver.py under `implementation`; see that file for commands."""

    def __init__(
        self,
        implementation: str,
        log_dir: Path,
        name: Optional[str] = None,
        start_timeout: float = 60,
        driver: Path = DRIVER,  # another script that speaks the same protocol (e.g. averaging_driver.py)
    ):
        self.implementation = implementation
        self.name = name or f"{implementation}-peer"
        self.log_path = Path(log_dir) / f"{self.name}-{os.getpid()}-{time.monotonic_ns()}.log"
        self._responses: Dict[int, dict] = {}
        self._cond = threading.Condition()
        self._next_id = 0
        self._hello: queue.Queue[dict] = queue.Queue()
        self._closed = False
        cmd = python_command(implementation) + [str(driver)]
        self.proc = _spawn(cmd, implementation, self.log_path, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        threading.Thread(target=self._read_stdout, name=f"{self.name}-reader", daemon=True).start()
        try:
            hello = self._hello.get(timeout=start_timeout)
        except queue.Empty:
            self.close(graceful=False)
            raise HarnessError(
                f"{self.name} did not start within {start_timeout} s; log tail:\n{_log_tail(self.log_path)}"
            ) from None
        if hello.get("event") != "hello":
            self.close(graceful=False)
            raise HarnessError(f"{self.name} exited before starting; log tail:\n{_log_tail(self.log_path)}")
        self.version, self.file, self.pid = hello["version"], hello["file"], hello["pid"]
        try:
            check_implementation(implementation, self.version, self.file)
        except HarnessError:
            self.close(graceful=False)
            raise

    def _read_stdout(self):
        for raw in self.proc.stdout:
            try:
                message = json.loads(raw)
            except ValueError:
                continue  # not protocol output
            if message.get("event") == "hello":
                self._hello.put(message)
                continue
            with self._cond:
                self._responses[message["id"]] = message
                self._cond.notify_all()
        self._hello.put({"event": "eof"})
        with self._cond:
            self._cond.notify_all()

    def submit(self, cmd: str, **args: Any) -> int:
        """Sends a command without waiting; returns its id for `wait`. Commands run concurrently in the peer."""
        with self._cond:
            request_id, self._next_id = self._next_id, self._next_id + 1
        line = json.dumps({"id": request_id, "cmd": cmd, "args": args}) + "\n"
        try:
            self.proc.stdin.write(line.encode())
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError, OSError) as e:
            raise HarnessError(f"{self.name} is gone ({e}); log tail:\n{_log_tail(self.log_path)}") from None
        return request_id

    def wait(self, request_id: int, timeout: float = 30, cmd: str = "command") -> Any:
        deadline = time.monotonic() + timeout
        with self._cond:
            while request_id not in self._responses:
                remaining = deadline - time.monotonic()
                if self.proc.poll() is not None and request_id not in self._responses:
                    raise HarnessError(
                        f"{self.name} exited with {self.proc.returncode} during {cmd}; "
                        f"log tail:\n{_log_tail(self.log_path)}"
                    )
                if remaining <= 0:
                    raise HarnessError(
                        f"{self.name}: {cmd} got no answer within {timeout} s; log tail:\n{_log_tail(self.log_path)}"
                    )
                self._cond.wait(min(remaining, 0.5))
            response = self._responses.pop(request_id)
        if not response["ok"]:
            raise RemoteError(self.name, cmd, response["error_type"], response["error"])
        return response["result"]

    def call(self, cmd: str, timeout: float = 30, **args: Any) -> Any:
        return self.wait(self.submit(cmd, **args), timeout=timeout, cmd=cmd)

    def close(self, graceful: bool = True, timeout: float = 15) -> None:
        if self._closed:
            return
        self._closed = True
        members = process_tree(self.proc)  # listed now: a graceful exit would orphan anything left behind
        if graceful and self.proc.poll() is None:
            try:
                self.call("shutdown", timeout=timeout)
                self.proc.wait(timeout=5)
            except (HarnessError, RemoteError, subprocess.TimeoutExpired):
                pass
        kill_tree(self.proc, known_members=members)
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except Exception:
                pass

    def log_tail(self, lines: int = 40) -> str:
        return _log_tail(self.log_path, lines)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def __repr__(self):
        return f"PeerProcess({self.name}, {self.version} from {self.file})"


# --- hivemind-dht command-line tool ---

INITIAL_PEERS_HINT = re.compile(r"use --initial_peers (.+?)\s*$")
ROUTING_TABLE_REPORT = re.compile(r"(\d+) DHT nodes \(including this one\) are in the local routing table")


class CliProcess:
    """Runs `hivemind-dht` of one implementation; its stderr (where the tool logs) is collected line by line."""

    def __init__(self, implementation: str, args: Sequence[str], log_dir: Path, name: Optional[str] = None):
        self.implementation = implementation
        self.name = name or f"{implementation}-hivemind-dht"
        self.log_path = Path(log_dir) / f"{self.name}-{os.getpid()}-{time.monotonic_ns()}.log"
        self.lines: List[str] = []
        self._cond = threading.Condition()
        entry = "import sys; from hivemind.hivemind_cli.run_dht import main; sys.argv[0] = 'hivemind-dht'; main()"
        if implementation == "original":
            cmd = [str(ORIGINAL_VENV / "bin" / "hivemind-dht")]  # the original's own console script
        else:
            cmd = python_command(implementation) + ["-c", entry]
        # stdout and stderr both go to the log (the tool is expected to log to stderr only)
        self.proc = _spawn(cmd + list(args), implementation, self.log_path, stdin=subprocess.DEVNULL)
        self._stderr = open(self.log_path, "rb")
        self._follower = threading.Thread(target=self._follow_log, name=f"{self.name}-log", daemon=True)
        self._follower.start()

    def _follow_log(self):
        buffer = b""
        while True:
            try:
                chunk = self._stderr.read(65536)
            except ValueError:  # closed by stop()
                return
            if chunk:
                buffer += chunk
                *complete, buffer = buffer.split(b"\n")
                with self._cond:
                    self.lines.extend(line.decode(errors="replace") for line in complete)
                    self._cond.notify_all()
            elif self.proc.poll() is not None:
                with self._cond:
                    self._cond.notify_all()
                return
            else:
                time.sleep(0.05)

    def wait_for(self, pattern: "re.Pattern", timeout: float = 30, start: int = 0) -> "re.Match":
        """Waits for a stderr line (from index `start`) matching `pattern`; returns the match."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines[start:]:
                    match = pattern.search(line)
                    if match:
                        return match
                if self.proc.poll() is not None:
                    raise HarnessError(
                        f"{self.name} exited with {self.proc.returncode} before printing {pattern.pattern!r}; "
                        f"log tail:\n{_log_tail(self.log_path)}"
                    )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise HarnessError(
                        f"{self.name} printed no {pattern.pattern!r} within {timeout} s; "
                        f"log tail:\n{_log_tail(self.log_path)}"
                    )
                self._cond.wait(min(remaining, 0.2))

    def initial_peers(self, timeout: float = 30) -> List[str]:
        """The multiaddrs the tool tells users to pass as --initial_peers."""
        return self.wait_for(INITIAL_PEERS_HINT, timeout).group(1).split()

    def stop(self, timeout: float = 15) -> Optional[int]:
        """Ctrl-C (SIGINT) the tool as a user would; returns its exit status (None if it had to be killed)."""
        members = process_tree(self.proc)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        status = self.proc.poll()
        kill_tree(self.proc, known_members=members)
        self._follower.join(timeout=5)  # collects the last lines the tool wrote
        self._stderr.close()
        return status

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.stop()
