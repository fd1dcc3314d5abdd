"""Ctrl-C (SIGINT) while a mixture or a RemoteExpert waits for slow experts ends the call at once and leaves nothing
running: the expert calls are cancelled, on this side (no task left on the RemoteExpertWorker loop) and on the
server's (its handlers, which run on the same loop here, are cancelled too)."""

import asyncio
import os
import signal
import threading
import time

import pytest
import torch
import torch.nn as nn
from moe_client_fakes import FakeExpertServer

from hivemind.dht import DHT
from hivemind.moe import RemoteMixtureOfExperts
from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker
from hivemind.moe.server.dht_handler import get_experts

HID = 4


@pytest.fixture(scope="module")
def swarm():
    server = FakeExpertServer({"ffn.0": nn.Linear(HID, HID), "ffn.1": nn.Linear(HID, HID)}, HID)
    client_dht = DHT(start=True, initial_peers=server.dht.get_visible_maddrs(), host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    try:
        yield server, client_dht
    finally:
        client_dht.shutdown()
        server.stop()


def interrupted_after(seconds: float, call) -> float:
    """Run ``call`` in this (the main) thread, send SIGINT after ``seconds``; how long until KeyboardInterrupt."""
    timer = threading.Timer(seconds, os.kill, (os.getpid(), signal.SIGINT))
    started = time.monotonic()
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            call()
    finally:
        timer.cancel()
    return time.monotonic() - started


@pytest.mark.timeout(60)
@pytest.mark.parametrize("caller", ["mixture", "remote_expert"])
def test_interrupting_a_call_of_slow_experts_cancels_it_everywhere(swarm, caller):
    server, client_dht = swarm
    server.handler.reset_faults()
    moe = RemoteMixtureOfExperts(in_features=HID, grid_size=(2,), dht=client_dht, uid_prefix="ffn.", k_best=2)
    (expert,) = get_experts(client_dht, ["ffn.0"])
    inputs = torch.randn(3, HID, requires_grad=True)
    call = (lambda: moe(inputs)) if caller == "mixture" else (lambda: expert(inputs))
    call()  # (fetches the info)
    loop = RemoteExpertWorker._get_loop()
    tasks_before = len(asyncio.all_tasks(loop))
    server.handler.delays.update({"ffn.0": 30, "ffn.1": 30})
    assert interrupted_after(1.0, call) < 5
    deadline = time.monotonic() + 5
    while len(asyncio.all_tasks(loop)) > tasks_before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(asyncio.all_tasks(loop)) <= tasks_before, [repr(task)[:120] for task in asyncio.all_tasks(loop)]
