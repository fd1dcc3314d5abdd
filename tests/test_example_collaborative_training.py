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
MONITOR_FINISHED = r"monitor finished \(last checkpoint: epoch (\d+)\)"


class Peer:
    """A script of the example in its own process group; its stdout lines are collected by a thread."""

    def __init__(self, script: str, *args: str, cwd: str, with_log: bool = False):
        self.process = subprocess.Popen(
            [sys.executable, os.path.join(EXAMPLE, script), *args], cwd=cwd, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT if with_log else subprocess.DEVNULL, text=True, start_new_session=True,
        )  # fmt: skip
        self.lines, self.new_lines = [], queue.Queue()  # new_lines only wakes up wait_for
        self.output_ended = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line.rstrip())
            self.new_lines.put(line.rstrip())
        self.output_ended.set()
        self.new_lines.put(None)

    def wait_for(self, pattern: str, deadline: float, accept=lambda match: True) -> re.Match:
        """The first line (printed so far or later) matching ``pattern`` and ``accept``."""
        seen = 0
        while True:
            ended = self.output_ended.is_set()  # no line is added after it is set
            new = self.lines[seen:]
            for line in new:
                match = re.search(pattern, line)
                if match and accept(match):
                    return match
            seen += len(new)
            if ended or time.monotonic() >= deadline:
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

    def stop(self, last_line: str) -> None:
        """After interrupt(): wait until the script prints ``last_line`` (its peers are shut down by then), then end
        its process group: the interpreter's own teardown (a second or more of CPU with torch loaded) is not waited
        for. A missing ``last_line`` is reported by the caller."""
        try:
            self.wait_for(last_line, deadline=time.monotonic() + 20)
        except AssertionError:
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
    monitor = Peer("run_monitor.py", *TINY, "--checkpoint_dir", str(checkpoint_dir), "--checkpoint_every", "2",
                   "--refresh_period", "0.5", cwd=str(tmp_path))  # fmt: skip
    peers = [monitor]
    try:
        address = monitor.wait_for(r"--initial_peers (.+)$", deadline).group(1).split()
        # 32 local steps per epoch for a lone trainer: with 8 (target 64) the first trainer up ran ~10 epochs/s alone,
        # and the second one, loading the swarm's state to catch up, stayed behind for up to half a minute
        trainer_args = [*TINY, "--initial_peers", *address, "--target_batch_size", "256", "--batch_size", "8",
                        "--matchmaking_time", "0.5", "--averaging_timeout", "10", "--num_threads", "1"]  # fmt: skip
        trainers = [Peer("run_trainer.py", *trainer_args, "--seed", str(i), cwd=str(tmp_path)) for i in range(2)]
        peers += trainers
        # both trainers publish, then a checkpoint is saved while the run goes on and reaches epoch 4
        monitor.wait_for(r"; 2 peers publishing", deadline)
        monitor.wait_for(r"saved checkpoint of epoch \d+", deadline)
        for trainer in trainers:
            trainer.wait_for(EPOCH_LINE.pattern, deadline, accept=lambda match: int(match.group(1)) >= 4)
    finally:
        for peer in peers:
            peer.interrupt()
        for peer in peers:
            peer.stop(last_line="monitor finished" if peer is monitor else "trainer finished")

    losses = {}  # epoch -> loss reported by a trainer (one that joined late starts at the swarm's epoch)
    for trainer in trainers:
        losses.update((int(m.group(1)), float(m.group(2))) for m in map(EPOCH_LINE.search, trainer.lines) if m)
        assert any("trainer finished" in line for line in trainer.lines), trainer.lines  # a clean shutdown
    finished = monitor.wait_for(MONITOR_FINISHED, deadline=0)  # printed by now, or the output is shown
    first, last = min(losses), max(losses)
    assert first == 0 and last >= 4 and losses[last] < losses[first] - 0.5, f"the loss did not go down: {losses}"
    checkpoint = torch.load(checkpoint_dir / "checkpoint.pt", weights_only=False)
    assert checkpoint["epoch"] >= 2 and "token_embedding.weight" in checkpoint["model"]
    assert int(finished.group(1)) == checkpoint["epoch"]  # the monitor names the checkpoint it left on disk
    assert checkpoint["validation_loss"] < 5.0  # a model that learned nothing: log(256) = 5.55


@pytest.mark.timeout(60)
def test_monitor_without_trainers_says_it_saved_no_checkpoint(tmp_path):
    monitor = Peer("run_monitor.py", *TINY, "--checkpoint_dir", str(tmp_path / "checkpoints"), cwd=str(tmp_path))
    try:
        monitor.wait_for(r"monitoring run 'stdlib_lm'", deadline=time.monotonic() + 40)
    finally:
        monitor.interrupt()
        monitor.stop(last_line="monitor finished")
    assert "monitor finished (no checkpoint saved)" in monitor.lines, monitor.lines
    assert not (tmp_path / "checkpoints" / "checkpoint.pt").exists()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("script, last_line", [("run_monitor.py", "monitor finished (no checkpoint saved)"),
                                               ("run_trainer.py", "trainer finished at epoch 0")])  # fmt: skip
def test_ctrl_c_while_a_peer_starts_up_still_finishes_cleanly(tmp_path, script, last_line):
    # the SIGINT lands while the script loads torch and builds its saver / optimizer (seconds after the address line)
    peer = Peer(script, *TINY, "--checkpoint_dir", str(tmp_path / "checkpoints"), cwd=str(tmp_path)) \
        if script == "run_monitor.py" else Peer(script, *TINY, cwd=str(tmp_path))  # fmt: skip
    try:
        peer.wait_for(r"--initial_peers ", deadline=time.monotonic() + 40)
    finally:
        peer.interrupt()
        peer.stop(last_line=re.escape(last_line))
    assert "interrupted while starting" in peer.lines, peer.lines
    assert last_line in peer.lines, peer.lines


@pytest.mark.timeout(120)
def test_monitor_does_not_ask_for_the_state_at_every_refresh_once_the_trainers_left(tmp_path):
    # a trainer's metrics outlive it (60 s): the monitor asked for a state every --refresh_period meanwhile (or
    # forever, with a peer still storing them), and each time the library logged "Nobody shares a state ..."
    deadline = time.monotonic() + 100
    first = subprocess.Popen([sys.executable, "-m", "hivemind.hivemind_cli.run_dht", "--host_maddrs",
                              "/ip4/127.0.0.1/tcp/0"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)  # fmt: skip
    peers = []
    try:
        address = next(line for line in first.stderr if "--initial_peers" in line).split("--initial_peers ")[1].split()
        trainer = Peer("run_trainer.py", *TINY, "--initial_peers", *address, "--target_batch_size", "16",
                       "--batch_size", "8", "--max_epochs", "2", "--num_threads", "1", cwd=str(tmp_path))  # fmt: skip
        peers.append(trainer)
        trainer.wait_for(r"trainer finished at epoch 2", deadline)
        monitor = Peer("run_monitor.py", *TINY, "--initial_peers", *address, "--checkpoint_dir",
                       str(tmp_path / "checkpoints"), "--checkpoint_every", "1", "--refresh_period", "0.2",
                       cwd=str(tmp_path), with_log=True)  # fmt: skip
        peers.append(monitor)
        monitor.wait_for(r"epoch 1: mean loss", deadline)  # the trainer's last record
        monitor.wait_for(r"no trainer shared a newer state", deadline)
        time.sleep(3)  # 15 refresh periods
    finally:
        for peer in peers:
            peer.interrupt()
        for peer in peers:
            peer.stop(last_line="monitor finished" if peer is not peers[0] else "trainer finished")
        first.send_signal(signal.SIGINT)
        first.wait(timeout=30)
    asked = [line for line in monitor.lines if "Nobody shares a state" in line]
    assert len(asked) == 1, asked


@pytest.mark.timeout(60)
def test_trainer_with_default_options_starts_without_warnings(tmp_path):
    # the default --matchmaking_time (3 s) was not above the averagers' request_timeout (3 s): each of the two
    # averagers warned about it, at every start, about an option the user never set
    trainer = Peer("run_trainer.py", *TINY, cwd=str(tmp_path), with_log=True)
    try:
        trainer.wait_for(r"trainer joined run 'stdlib_lm' at epoch 0", deadline=time.monotonic() + 40)
    finally:
        trainer.interrupt()
        trainer.stop(last_line="trainer finished")
    warnings = [line for line in trainer.lines if "[WARN]" in line or "[ERROR]" in line]
    assert not warnings, warnings


@pytest.mark.timeout(60)
def test_a_client_mode_trainer_without_initial_peers_is_a_usage_error(tmp_path):
    # it used to start a run of its own that nobody could join (it accepts no connections) and train alone, silently
    result = subprocess.run(
        [sys.executable, os.path.join(EXAMPLE, "run_trainer.py"), *TINY, "--client_mode", "--max_epochs", "1"],
        cwd=str(tmp_path), capture_output=True, text=True, timeout=50,
    )  # fmt: skip
    assert result.returncode == 2, (result.stdout, result.stderr[-2000:])
    assert "--client_mode needs --initial_peers" in result.stderr
    assert "trainer joined run" not in result.stdout
