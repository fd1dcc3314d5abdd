"""hivemind-dht start-up lines, a second peer bootstrapping from the first, Ctrl-C."""

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from typing import List

import pytest

INITIAL_PEERS_LINE = re.compile(
    r"Running a DHT instance\. To connect other peers to this one, use (--initial_peers .+)$"
)


class CLIPeer:
    """A hivemind-dht subprocess whose stderr lines are collected by a thread."""

    def __init__(self, *args: str):
        env = dict(os.environ, HIVEMIND_COLORS="0")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "hivemind.hivemind_cli.run_dht", "--host_maddrs", "/ip4/127.0.0.1/tcp/0", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.lines: List[str] = []
        self._queue: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stderr:
            self._queue.put(line.rstrip("\n"))

    def wait_for(self, pattern: str, timeout: float = 20) -> re.Match:
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        while time.monotonic() < deadline:
            try:
                line = self._queue.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            self.lines.append(line)
            match = regex.search(line)
            if match:
                return match
        raise AssertionError(f"no line matching {pattern!r} within {timeout} s; got:\n" + "\n".join(self.lines))

    def interrupt(self, signal_number: int = signal.SIGINT, timeout: float = 20) -> int:
        self.process.send_signal(signal_number)
        return self.process.wait(timeout=timeout)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.mark.timeout(90)
def test_second_peer_bootstraps_from_printed_line_and_both_exit_cleanly():
    first = CLIPeer("--refresh_period", "1")
    second = None
    try:
        initial_peers = first.wait_for(INITIAL_PEERS_LINE.pattern).group(1)
        addresses = initial_peers.split()[1:]
        assert addresses and all(re.fullmatch(r"/ip4/127\.0\.0\.1/tcp/\d+/p2p/\w+", addr) for addr in addresses)
        first.wait_for(r"Full list of visible multiaddresses: /ip4/")

        second = CLIPeer("--refresh_period", "1", *initial_peers.split())
        second.wait_for(INITIAL_PEERS_LINE.pattern)
        for peer in (first, second):
            peer.wait_for(r"2 DHT nodes \(including this one\) are in the local routing table $")
            peer.wait_for(r"Local storage contains \d+ keys")

        assert second.interrupt(signal.SIGINT) == 0
        second.wait_for(r"Caught signal 2 \(Interrupt\), shutting down")
        assert first.interrupt(signal.SIGTERM) == 0
        first.wait_for(r"Caught signal 15 \(Terminated\), shutting down")
        assert first.process.stdout.read() == "" and second.process.stdout.read() == ""  # logs go to stderr only
    finally:
        for peer in (first, second):
            if peer is not None:
                peer.kill()


@pytest.mark.timeout(60)
def test_unreachable_initial_peer_fails_start_up():
    peer = CLIPeer("--initial_peers", "/ip4/127.0.0.1/tcp/9/p2p/QmSoLnSGccFuZQJzRadHn95W2CrSFmZuTdDWP8HXaHca9z")
    try:
        assert peer.process.wait(timeout=50) != 0
    finally:
        peer.kill()


@pytest.mark.timeout(60)
def test_first_status_report_comes_right_after_the_start_up_lines():
    # as hivemind 1.1.12: the routing table and storage are reported at once (did this peer join?), not only after
    # the first --refresh_period (30 s by default)
    peer = CLIPeer("--refresh_period", "600")
    try:
        peer.wait_for(r"Full list of visible multiaddresses: /ip4/", timeout=40)
        peer.wait_for(r"^\S+ \S+ \S+ \[INFO\] 1 DHT nodes \(including this one\) are in the local routing table $")
        peer.wait_for(r"\[INFO\] Local storage contains 0 keys$")
        assert peer.interrupt(signal.SIGINT) == 0
    finally:
        peer.kill()


@pytest.mark.timeout(60)
def test_the_tool_exits_with_an_error_when_its_daemon_dies():
    # a bootstrap peer without its p2pd can no longer be reached: it must not go on reporting as if it served
    import psutil

    peer = CLIPeer("--refresh_period", "1")
    try:
        peer.wait_for(r"Local storage contains 0 keys$", timeout=40)
        daemons = [child for child in psutil.Process(peer.process.pid).children(recursive=True)]
        daemons = [child for child in daemons if child.name() == "p2pd"]
        assert len(daemons) == 1
        daemons[0].kill()
        assert peer.process.wait(timeout=30) == 1
        peer.wait_for(r"\[ERROR\] .*p2pd daemon stopped.*; exiting")
    finally:
        peer.kill()
