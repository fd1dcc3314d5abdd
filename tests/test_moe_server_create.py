"""Server.create (uids, patterns, checkpoints, compression, DHT options), background_server and repeated start-up."""

import os
import random
import threading
import time
from typing import List

import psutil
import pytest
import torch

from hivemind.dht import DHT
from hivemind.moe.client.expert import RemoteExpert
from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker
from hivemind.moe.expert_uid import ExpertInfo, is_valid_uid
from hivemind.moe.server import Server, background_server
from hivemind.moe.server.checkpoints import store_experts
from hivemind.moe.server.connection_handler import _daemon_listen_maddr
from hivemind.moe.server.dht_handler import declare_experts, get_experts
from hivemind.moe.server.expert_pattern import generate_uids_from_pattern, parse_expert_pattern
from hivemind.proto.runtime_pb2 import CompressionType
from hivemind.utils.nested import nested_flatten
from hivemind.utils.timed_storage import get_dht_time

LOOPBACK = dict(host_maddrs=["/ip4/127.0.0.1/tcp/0"], device="cpu")


def test_pattern_blocks_are_parsed_and_checked():
    assert parse_expert_pattern("ffn.[0:4].7") == ["ffn", (0, 4), "7"]
    for bad in ("ffn", "ffn.[3:3]", "ffn.[a:4]", "ffn..1", "[0:3].1"):
        with pytest.raises(ValueError):
            parse_expert_pattern(bad)


def test_generated_uids_match_the_pattern_and_skip_taken_ones():
    taken = {f"ffn.{i}.0" for i in range(0, 8, 2)}
    uids = generate_uids_from_pattern(
        4, "ffn.[0:8].0", lambda candidates: [uid in taken for uid in candidates], rng=random.Random(0)
    )
    assert len(set(uids)) == 4 and not taken.intersection(uids)
    assert all(is_valid_uid(uid) and uid.startswith("ffn.") and uid.endswith(".0") for uid in uids)


def test_too_small_pattern_is_refused():
    with pytest.raises(ValueError, match="free expert uids"):
        generate_uids_from_pattern(3, "ffn.[0:2]", lambda candidates: [False] * len(candidates))


def test_without_pattern_uids_are_numbered():
    assert generate_uids_from_pattern(3, None, lambda c: [False] * len(c), exclude=["expert.1"]) == [
        "expert.0",
        "expert.2",
        "expert.3",
    ]


@pytest.mark.timeout(60)
def test_create_skips_uids_already_in_the_dht():
    with DHT(start=True) as other:
        declare_experts(other, [f"ffn.{i}" for i in range(3)], get_dht_time() + 60)
        server = Server.create(
            num_experts=2, expert_pattern="ffn.[0:5]", hidden_dim=8, initial_peers=other.get_visible_maddrs(),
            start=True, **LOOPBACK,
        )  # fmt: skip
        try:
            assert sorted(server.module_backends) == ["ffn.3", "ffn.4"]
        finally:
            server.shutdown()


@pytest.mark.timeout(60)
def test_create_records_compression_in_floating_descriptors():
    server = Server.create(
        expert_uids=["drop.0"], expert_cls="det_dropout", hidden_dim=8, compression=CompressionType.FLOAT16,
        start=False, **LOOPBACK,
    )  # fmt: skip
    try:
        backend = server.module_backends["drop.0"]
        descriptors = list(nested_flatten(backend.forward_schema)) + list(nested_flatten(backend.outputs_schema))
        for descriptor in descriptors:
            expected = CompressionType.FLOAT16 if descriptor.dtype.is_floating_point else CompressionType.NONE
            assert descriptor.compression == expected
        assert any(not d.dtype.is_floating_point for d in descriptors)  # det_dropout's mask
    finally:
        server.shutdown()


@pytest.mark.timeout(60)
def test_create_loads_checkpoints_and_reuses_their_uids(tmp_path):
    first = Server.create(expert_uids=["ffn.7", "ffn.9"], hidden_dim=8, start=False, **LOOPBACK)
    with torch.no_grad():
        for parameter in first.module_backends["ffn.9"].module.parameters():
            parameter.fill_(0.25)
    store_experts(first.module_backends, tmp_path)
    first.shutdown()

    server = Server.create(num_experts=3, hidden_dim=8, checkpoint_dir=tmp_path, start=True, **LOOPBACK)
    try:
        assert sorted(server.module_backends) == ["expert.0", "ffn.7", "ffn.9"]
        loaded = list(server.module_backends["ffn.9"].module.parameters())
        assert all(torch.all(parameter == 0.25) for parameter in loaded)
    finally:
        server.shutdown()


@pytest.mark.timeout(60)
def test_more_checkpoints_than_experts_is_refused(tmp_path):
    first = Server.create(expert_uids=["ffn.1", "ffn.2"], hidden_dim=8, start=False, **LOOPBACK)
    store_experts(first.module_backends, tmp_path)
    first.shutdown()
    with pytest.raises(ValueError, match="more than num_experts"):
        Server.create(num_experts=1, hidden_dim=8, checkpoint_dir=tmp_path, start=False, **LOOPBACK)


@pytest.mark.timeout(60)
def test_dht_options_are_forwarded(tmp_path):
    identity = str(tmp_path / "server.key")
    server = Server.create(expert_uids=["ffn.0"], hidden_dim=8, identity_path=identity, start=True, **LOOPBACK)
    try:
        assert os.path.exists(identity)
        assert all(str(maddr).startswith("/ip4/127.0.0.1/") for maddr in server.dht.get_visible_maddrs())
    finally:
        server.shutdown()


@pytest.mark.timeout(60)
def test_announce_maddrs_are_the_visible_maddrs():
    announced = ["/ip4/203.0.113.5/tcp/31337", "/ip4/198.51.100.7/tcp/4001"]
    server = Server.create(expert_uids=["ffn.0"], hidden_dim=8, announce_maddrs=announced, start=True, **LOOPBACK)
    try:
        visible = [str(maddr) for maddr in server.dht.get_visible_maddrs()]
        assert [maddr.rsplit("/p2p/", 1)[0] for maddr in visible] == announced
    finally:
        server.shutdown()


class SlowStartingHandler:
    """A connection handler that takes until shutdown() to register (a daemon that does not answer)."""

    def __init__(self):
        self.released = threading.Event()

    def run_in_thread(self, await_ready=True, timeout=None):
        self.released.wait(60)

    def is_alive(self):
        return False

    def shutdown(self):
        self.released.set()


@pytest.mark.timeout(60)
def test_run_in_background_raises_timeout_error_when_not_ready_in_time():
    server = Server.create(expert_uids=["ffn.0"], hidden_dim=8, start=False, **LOOPBACK)
    server.conn_handlers = [SlowStartingHandler()]
    started = time.monotonic()
    try:
        with pytest.raises(TimeoutError, match="not become ready within 0.5 s"):
            server.run_in_background(await_ready=True, timeout=0.5)
        assert time.monotonic() - started < 10 and not server.ready.is_set()
    finally:
        server.shutdown()
    assert not server.is_alive()


@pytest.mark.timeout(60)
def test_background_server_serves_and_stops():
    children_before = {child.pid for child in psutil.Process().children()}  # other tests' in this worker
    with background_server(expert_uids=["ffn.0"], hidden_dim=8, **LOOPBACK) as server_info:
        with DHT(initial_peers=server_info.addrs, start=True) as client_dht:
            (expert,) = get_experts(client_dht, ["ffn.0"])
            assert expert is not None and expert.peer_id == server_info.peer_id
            assert expert(torch.randn(2, 8)).shape == (2, 8)
    # the server's and the client DHT's processes exit on their own; allow a loaded machine a few seconds for it
    ours = [child for child in psutil.Process().children() if child.pid not in children_before]
    _, still_running = psutil.wait_procs(ours, timeout=15)
    assert [(p.pid, p.cmdline()) for p in still_running] == []


@pytest.mark.timeout(60)
def test_background_server_that_fails_to_start_raises():
    with pytest.raises(RuntimeError, match="unknown expert class"):
        with background_server(expert_uids=["ffn.0"], expert_cls="no_such_class", **LOOPBACK):
            pass


def _socket_files_of(server: Server) -> List[str]:
    """The socket files this server's DHT, daemon and handlers use (all must be gone after shutdown)."""
    daemon_socket = server.dht.run_coroutine(_daemon_listen_maddr).replace("/unix", "", 1)
    client_socket = daemon_socket.replace("hivemind-p2pd-", "hivemind-p2pclient-")
    handler_sockets = [str(h._p2p._client_listen_maddr).replace("/unix", "", 1) for h in server.conn_handlers]
    return [server.dht._socket_address, daemon_socket, client_socket, *handler_sockets]


@pytest.mark.timeout(240)
def test_fifty_create_serve_shutdown_cycles_leave_nothing_behind():
    children_before = {child.pid for child in psutil.Process().children(recursive=True)}
    with DHT(start=True, host_maddrs=LOOPBACK["host_maddrs"]) as client_dht:
        client_p2p = RemoteExpertWorker.run_coroutine(client_dht.replicate_p2p())
        try:
            _create_serve_and_shut_down(client_dht, client_p2p, cycles=50)
        finally:
            RemoteExpertWorker.run_coroutine(client_p2p.shutdown())
    children = psutil.Process().children(recursive=True)
    leftover = [c.pid for c in children if c.pid not in children_before and c.status() != psutil.STATUS_ZOMBIE]
    assert leftover == []


def _create_serve_and_shut_down(client_dht: DHT, client_p2p, cycles: int) -> None:
    for cycle in range(cycles):
        # each server joins the client's DHT, so the client's daemon learns its addresses
        server = Server.create(
            num_experts=2, expert_pattern=f"cycle{cycle}.[0:8]", hidden_dim=8,
            initial_peers=client_dht.get_visible_maddrs(), start=True, **LOOPBACK,
        )  # fmt: skip
        assert server.ready.is_set(), f"cycle {cycle}"
        socket_files = _socket_files_of(server)
        assert all(os.path.exists(path) for path in socket_files), socket_files
        try:
            uid, backend = next(iter(server.module_backends.items()))
            expert = RemoteExpert(ExpertInfo(uid, server.dht.peer_id), client_p2p)
            x = torch.randn(2, 8)
            assert torch.allclose(expert(x), backend.module(x), atol=1e-5), f"cycle {cycle}"
        finally:
            server.shutdown()
        assert [path for path in socket_files if os.path.exists(path)] == [], f"cycle {cycle}"


def test_an_expert_pattern_with_spaces_inside_a_range_is_accepted():
    """hivemind 1.1.12 generates uids from 'ffn.[ 0 : 4 ]' as from 'ffn.[0:4]'."""
    from hivemind.moe.server.expert_pattern import parse_expert_pattern

    assert parse_expert_pattern("ffn.[ 0 : 4 ].[2:3]") == ["ffn", (0, 4), (2, 3)]
