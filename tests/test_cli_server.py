"""hivemind-server: custom expert classes from a file, the start-up lines, a client call, Ctrl-C exits 0."""

import os
import queue
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from typing import List

import psutil
import pytest
import torch

from hivemind.dht import DHT
from hivemind.hivemind_cli.run_server import make_parser, parse_server_options
from hivemind.moe.server.dht_handler import get_experts

CUSTOM_EXPERTS = textwrap.dedent(
    """
    import torch
    from hivemind.moe.server import register_expert_class

    @register_expert_class("cli_test_scaled", lambda batch_size, hid_dim: torch.empty((batch_size, hid_dim)))
    class ScaledExpert(torch.nn.Module):
        def __init__(self, hid_dim):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.full((hid_dim,), 2.0))

        def forward(self, x):
            return x * self.scale
    """
)


class CLIServer:
    """A hivemind-server subprocess whose stderr lines are collected by a thread."""

    def __init__(self, *args: str):
        env = dict(os.environ, HIVEMIND_COLORS="0")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "hivemind.hivemind_cli.run_server", *args],
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

    def wait_for(self, pattern: str, timeout: float = 60) -> re.Match:  # importing torch is slow on a busy machine
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

    def rest_of_output(self) -> str:
        while not self._queue.empty():
            self.lines.append(self._queue.get())
        return "\n".join(self.lines)

    def interrupt(self, signal_number: int = signal.SIGINT, timeout: float = 30) -> int:
        self.process.send_signal(signal_number)
        return self.process.wait(timeout=timeout)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def custom_module_path(tmp_path):
    path = tmp_path / "custom_experts.py"
    path.write_text(CUSTOM_EXPERTS)
    return str(path)


@pytest.mark.timeout(180)
def test_server_with_custom_experts_prints_its_lines_serves_and_exits_on_ctrl_c(custom_module_path):
    server = CLIServer(
        "--expert_cls", "cli_test_scaled", "--custom_module_path", custom_module_path, "--hidden_dim", "4",
        "--expert_uids", "scaled.0", "scaled.1", "--host_maddrs", "/ip4/127.0.0.1/tcp/0", "--device", "cpu",
        "--optimizer", "none", "--stats_report_interval", "1",
    )  # fmt: skip
    client_dht = None
    try:
        maddrs = server.wait_for(r"Running DHT node on (\[.*\]), initial peers = \[\]").group(1)
        maddrs = re.findall(r"'(/ip4/127\.0\.0\.1/tcp/\d+/p2p/\w+)'", maddrs)
        assert maddrs, "the start-up line lists no loopback multiaddr"
        server.wait_for(r"Server started with 2 modules:")
        server.wait_for(r"scaled\.0: ScaledExpert, 4 parameters")
        server.wait_for(r"scaled\.1: ScaledExpert, 4 parameters")
        pool_line = r"(scaled\.\d_(?:forward|backward)) starting, pid=(\d+)$"
        pools = dict(server.wait_for(pool_line).groups() for _ in range(4))
        assert sorted(pools) == ["scaled.0_backward", "scaled.0_forward", "scaled.1_backward", "scaled.1_forward"]
        assert set(pools.values()) == {str(server.process.pid)}  # the pools are threads of the server process
        server.wait_for(r"\[INFO\] Started$")

        client_dht = DHT(initial_peers=maddrs, start=True)
        experts = None
        for _ in range(100):  # the server announces its experts right after it starts
            experts = get_experts(client_dht, ["scaled.0", "scaled.1"])
            if all(expert is not None for expert in experts):
                break
            time.sleep(0.1)
        assert all(expert is not None for expert in experts), server.rest_of_output()
        x = torch.randn(3, 4)
        assert torch.allclose(experts[1](x), 2 * x)
        server.wait_for(r"Processed [1-9]\d* batches in last \d+\.\d\d seconds:$")
        batch_rate, example_rate = r"\d+\.\d\d (?:batches/s|s/batch)", r"\d+\.\d\d (?:examples/s|s/example)"
        server.wait_for(
            rf"scaled\.1_forward: 1 batches \({batch_rate}\), 3 examples \({example_rate}\), avg batch size 3\.00$"
        )

        assert server.interrupt(signal.SIGINT) == 0, server.rest_of_output()
        server.wait_for(r"Caught signal 2 \(Interrupt\), shutting down")
    finally:
        if client_dht is not None:
            client_dht.shutdown()
        server.kill()


@pytest.mark.timeout(120)
def test_sigterm_exits_zero():
    server = CLIServer("--num_experts", "1", "--expert_cls", "nop", "--hidden_dim", "4", "--device", "cpu")
    try:
        server.wait_for(r"Server started with 1 modules:")
        assert server.interrupt(signal.SIGTERM) == 0, server.rest_of_output()
        server.wait_for(r"Caught signal 15 \(Terminated\), shutting down")
    finally:
        server.kill()


def _run_until_started(*args: str) -> List[str]:
    """Start hivemind-server with nop experts, wait until it serves, Ctrl-C it: its "Running DHT node on" maddrs."""
    server = CLIServer("--expert_uids", "nop.0", "--expert_cls", "nop", "--hidden_dim", "4", "--device", "cpu", *args)
    try:
        maddrs = server.wait_for(r"Running DHT node on (\[.*\]), initial peers").group(1)
        server.wait_for(r"\[INFO\] Started$")
        assert server.interrupt(signal.SIGINT) == 0, server.rest_of_output()
        return re.findall(r"'([^']+)'", maddrs)
    finally:
        server.kill()


@pytest.mark.timeout(120)
def test_identity_path_keeps_the_peer_id_across_runs(tmp_path):
    identity = str(tmp_path / "server.key")
    with DHT(start=True, identity_path=identity, host_maddrs=["/ip4/127.0.0.1/tcp/0"]) as first_run:
        peer_id = first_run.peer_id.to_base58()  # the first run created the key file
    maddrs = _run_until_started("--host_maddrs", "/ip4/127.0.0.1/tcp/0", "--identity_path", identity)
    assert maddrs and {maddr.rsplit("/p2p/", 1)[1] for maddr in maddrs} == {peer_id}


@pytest.mark.timeout(120)
def test_announce_maddrs_are_the_visible_maddrs():
    announced = ["/ip4/203.0.113.5/tcp/31337", "/ip4/198.51.100.7/tcp/4001"]
    maddrs = _run_until_started("--host_maddrs", "/ip4/127.0.0.1/tcp/0", "--announce_maddrs", *announced)
    assert [maddr.rsplit("/p2p/", 1)[0] for maddr in maddrs] == announced


RAISE_FILE_LIMIT = """
import resource
from hivemind.hivemind_cli.run_server import make_parser, parse_server_options
from hivemind.utils.logging import use_hivemind_log_handler

use_hivemind_log_handler("in_root_logger")
parse_server_options(make_parser(), ["--num_experts", "1", "--increase_file_limit"])
print(*resource.getrlimit(resource.RLIMIT_NOFILE))
"""


@pytest.mark.timeout(60)
def test_increase_file_limit_raises_the_open_file_limit():
    resource = pytest.importorskip("resource")
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low_soft = 256

    def lower_soft_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (low_soft, hard))

    result = subprocess.run(
        [sys.executable, "-c", RAISE_FILE_LIMIT], preexec_fn=lower_soft_limit, capture_output=True, text=True,
        env=dict(os.environ, HIVEMIND_COLORS="0"), timeout=50,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    soft_after, hard_after = map(int, result.stdout.split())
    # the hard limit goes up to 32768 where that is allowed; the soft one up to 32768, or to the hard one if lower
    assert hard_after == resource.RLIM_INFINITY or hard_after >= min(hard, 32768)
    assert soft_after == (32768 if hard_after == resource.RLIM_INFINITY else min(32768, hard_after))
    assert f"Increasing file limit: soft {low_soft}=>{soft_after}, hard" in result.stderr


@pytest.mark.timeout(120)
def test_num_handlers_serves_from_that_many_child_processes():
    server = CLIServer(
        "--expert_uids", "nop.0", "--expert_cls", "nop", "--hidden_dim", "4", "--device", "cpu", "--host_maddrs",
        "/ip4/127.0.0.1/tcp/0", "--num_handlers", "2",
    )  # fmt: skip
    try:
        pids = server.wait_for(r"Serving from 2 connection handler processes, pids=\[(\d+), (\d+)\]$").groups()
        children = {child.pid for child in psutil.Process(server.process.pid).children()}
        assert {int(pid) for pid in pids} <= children
        server.wait_for(r"\[INFO\] Started$")
        assert server.interrupt(signal.SIGINT) == 0, server.rest_of_output()
    finally:
        server.kill()


def test_address_flags_keep_whole_multiaddrs():
    options = parse_server_options(
        make_parser(),
        ["--num_experts", "2", "--host_maddrs", "/ip4/127.0.0.1/tcp/0", "/ip6/::1/tcp/0",
         "--announce_maddrs", "/ip4/1.2.3.4/tcp/31337", "--identity_path", "id.key"],
    )  # fmt: skip
    assert options["host_maddrs"] == ["/ip4/127.0.0.1/tcp/0", "/ip6/::1/tcp/0"]
    assert options["announce_maddrs"] == ["/ip4/1.2.3.4/tcp/31337"]
    assert options["identity_path"] == "id.key"


def test_config_file_gives_defaults_and_command_line_wins(tmp_path):
    config = tmp_path / "server.yml"
    config.write_text("num_experts: 3\nhidden_dim: 64\noptimizer: sgd\nhost_maddrs: [/ip4/127.0.0.1/tcp/0]\n")
    options = parse_server_options(make_parser(), ["--config", str(config), "--hidden_dim", "32"])
    assert options["num_experts"] == 3 and options["hidden_dim"] == 32
    assert options["optim_cls"].keywords == {"lr": 0.01}
    assert options["host_maddrs"] == ["/ip4/127.0.0.1/tcp/0"]


@pytest.mark.parametrize(
    "argv",
    [[], ["--num_experts", "2", "--expert_uids", "a.0"], ["--expert_uids", "a.0", "--expert_pattern", "a.[0:3]"]],
    ids=["neither", "both", "pattern with uids"],
)
def test_expert_selection_misuse_is_a_usage_error(argv, capsys):
    with pytest.raises(SystemExit) as error:
        parse_server_options(make_parser(), argv)
    assert error.value.code == 2
    assert "--num_experts" in capsys.readouterr().err


@pytest.mark.timeout(180)
def test_the_server_exits_with_an_error_when_its_daemon_dies():
    # clients can no longer reach the experts of a server without its p2pd: it must not go on as if it served
    server = CLIServer("--num_experts", "1", "--expert_cls", "nop", "--hidden_dim", "4", "--device", "cpu")
    try:
        server.wait_for(r"\[INFO\] Started$")
        daemons = [child for child in psutil.Process(server.process.pid).children(recursive=True)]
        daemons = [child for child in daemons if child.name() == "p2pd"]
        assert len(daemons) == 1
        daemons[0].kill()
        assert server.process.wait(timeout=60) == 1, server.rest_of_output()
        server.wait_for(r"\[ERROR\] .*p2pd daemon stopped.*; exiting")
        server.wait_for(r"Server shutdown successfully")
    finally:
        server.kill()


@pytest.mark.timeout(180)
def test_the_server_prints_the_initial_peers_to_give_other_peers():
    server = CLIServer("--expert_uids", "nop.0", "--expert_cls", "nop", "--hidden_dim", "4", "--device", "cpu",
                       "--host_maddrs", "/ip4/127.0.0.1/tcp/0")  # fmt: skip
    try:
        maddrs = re.findall(r"'([^']+)'", server.wait_for(r"Running DHT node on (\[.*\]), initial peers").group(1))
        hint = server.wait_for(r"\[INFO\] To connect other peers to this server, use --initial_peers (.+)$").group(1)
        assert hint.split() == maddrs  # as printed: ready to paste into another command line
        with DHT(initial_peers=hint.split(), start=True) as dht:
            assert [expert.uid for expert in get_experts(dht, ["nop.0"])] == ["nop.0"]
        assert server.interrupt(signal.SIGINT) == 0, server.rest_of_output()
    finally:
        server.kill()


@pytest.mark.timeout(60)
def test_a_limit_that_cannot_reach_32768_is_reported_as_a_warning():
    resource = pytest.importorskip("resource")
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low_hard = 4096 if hard == resource.RLIM_INFINITY else min(hard, 4096)

    def lower_limits():  # a hard limit below 32768 that this process may not be allowed to raise again
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, low_hard))

    result = subprocess.run(
        [sys.executable, "-c", RAISE_FILE_LIMIT], preexec_fn=lower_limits, capture_output=True, text=True,
        env=dict(os.environ, HIVEMIND_COLORS="0"), timeout=50,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    soft_after, hard_after = map(int, result.stdout.split())
    assert f"Increasing file limit: soft 256=>{soft_after}, hard {low_hard}=>" in result.stderr
    if soft_after == resource.RLIM_INFINITY or soft_after >= 32768:
        return  # allowed to raise the hard limit here (e.g. privileged): nothing to warn about
    assert "[WARN]" in result.stderr and f"open file limit stays at {soft_after}, below 32768" in result.stderr, (
        result.stderr
    )
