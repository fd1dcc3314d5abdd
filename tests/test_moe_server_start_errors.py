"""A Server whose runtime cannot start (e.g. its experts cannot be moved to the device it was given) tells the caller
why: the error names the reason instead of 'Server failed to start: None'."""

import pytest
import torch
from test_moe_server import make_backends

from hivemind.dht import DHT
from hivemind.moe.server.server import Server

UNUSABLE_DEVICE = torch.device("cuda", 999)  # no machine has it: moving an expert there always raises


@pytest.mark.timeout(60)
def test_runtime_that_cannot_start_fails_the_start_with_its_reason():
    server = Server(DHT(start=True), make_backends(["expert.0"]), device=UNUSABLE_DEVICE)
    with pytest.raises(RuntimeError, match="Server failed to start") as failure:
        server.run_in_background(await_ready=True, timeout=30)
    assert failure.value.__cause__ is not None, f"the reason is missing: {failure.value}"
    assert str(failure.value) != "Server failed to start: None"
    assert not server.is_alive() and not server.dht.is_alive()  # what did start was stopped again


@pytest.mark.timeout(60)
def test_server_given_a_dht_that_has_exited_says_so():
    dht = DHT(start=True)
    dht.shutdown()
    server = Server(dht, make_backends(["expert.0"]))
    with pytest.raises(RuntimeError, match="Server failed to start") as failure:
        server.run_in_background(await_ready=True, timeout=30)
    assert "DHT process has exited" in str(failure.value.__cause__)
    assert not server.is_alive()


@pytest.mark.timeout(60)
def test_server_starts_a_dht_that_was_not_started():
    server = Server(DHT(start=False), make_backends(["expert.0"]))
    try:
        server.run_in_background(await_ready=True, timeout=30)
        assert server.dht.is_alive()
    finally:
        server.shutdown()
    assert not server.dht.is_alive()
