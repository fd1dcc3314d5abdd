"""examples/collaborative_training: two trainers and a monitor, started with the README's commands (a tiny model)."""

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(REPOSITORY, "examples", "collaborative_training")
TINY = ["--host_maddrs", "/ip4/127.0.0.1/tcp/0", "--hidden_size", "32", "--num_layers", "1", "--num_heads", "2",
        "--seq_length", "32", "--data_bytes", "100000", "--lr", "0.01"]  # fmt: skip
EPOCH_LINE = re.compile(r"epoch (\d+) done: mean loss ([\d.]+)")
MONITOR_LINE = re.compile(r"epoch (\d+): mean loss [\d.]+ reported by \d+ peers .*; (\d+) peers publishing")


class Peer:
    """A script of the example in its own process group; its stdout lines are collected by a thread."""

    def __init__(self, script: str, *args: str, cwd: str):
        self.process = subprocess.Popen(
            [sys.executable, os.path.join(EXAMPLE, script), *args], cwd=cwd, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, text=True, start_new_session=True,
        )  # fmt: skip
        self.lines, self.new_lines = [], queue.Queue()  # new_lines only wakes up wait_for
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line.rstrip())
            self.new_lines.put(line.rstrip())

    def wait_for(self, pattern: str, deadline: float, accept=lambda match: True) -> re.Match:
        """The first line (printed so far or later) matching ``pattern`` and ``accept``."""
        seen = 0
        while True:
            for line in self.lines[seen:]:
                match = re.search(pattern, line)
                if match and accept(match):
                    return match
            seen = len(self.lines)
            if time.monotonic() >= deadline:
                break
            try:
                self.new_lines.get(timeout=0.2)
            except queue.Empty:
                pass
        raise AssertionError(f"{pattern!r} was not printed in time; output so far:\n" + "\n".join(self.lines))

    def interrupt(self) -> None:
        """Ctrl-C: the script shuts down cleanly."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)

    def stop(self) -> None:
        """After interrupt(): wait for the script to exit, then kill what is left of its process group."""
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # DHT / averager children and p2pd, if any remain
        except ProcessLookupError:
            pass
        self.process.wait(timeout=10)


@pytest.mark.timeout(200)
def test_two_trainers_and_a_monitor_train_the_example_model(tmp_path):
    deadline = time.monotonic() + 160
    checkpoint_dir = tmp_path / "checkpoints"
    monitor = Peer("run_monitor.py", *TINY, "--checkpoint_dir", str(checkpoint_dir), "--checkpoint_every", "3",
                   "--refresh_period", "0.5", cwd=str(tmp_path))  # fmt: skip
    peers = [monitor]
    try:
        address = monitor.wait_for(r"--initial_peers (.+)$", deadline).group(1).split()
        trainer_args = [*TINY, "--initial_peers", *address, "--target_batch_size", "64", "--batch_size", "8",
                        "--matchmaking_time", "1", "--averaging_timeout", "10", "--num_threads", "1"]  # fmt: skip
        trainers = [Peer("run_trainer.py", *trainer_args, "--seed", str(i), cwd=str(tmp_path)) for i in range(2)]
        peers += trainers
        # both trainers publish, then a checkpoint is saved while the run goes on and reaches epoch 6
        monitor.wait_for(r"; 2 peers publishing", deadline)
        monitor.wait_for(r"saved checkpoint of epoch \d+", deadline)
        for trainer in trainers:
            trainer.wait_for(EPOCH_LINE.pattern, deadline, accept=lambda match: int(match.group(1)) >= 6)
    finally:
        for peer in peers:
            peer.interrupt()
        for peer in peers:
            peer.stop()

    losses = {}  # epoch -> loss reported by a trainer (one that joined late starts at the swarm's epoch)
    for trainer in trainers:
        losses.update((int(m.group(1)), float(m.group(2))) for m in map(EPOCH_LINE.search, trainer.lines) if m)
        assert any("trainer finished" in line for line in trainer.lines), trainer.lines  # a clean shutdown
    first, last = min(losses), max(losses)
    assert first == 0 and last >= 6 and losses[last] < losses[first] - 0.5, f"the loss did not go down: {losses}"
    checkpoint = torch.load(checkpoint_dir / "checkpoint.pt", weights_only=False)
    assert checkpoint["epoch"] >= 3 and "token_embedding.weight" in checkpoint["model"]
    assert checkpoint["validation_loss"] < 5.0  # a model that learned nothing: log(256) = 5.55
