"""A hostile expert server can fail a call with an error text of megabytes (up to the largest message, 4 MiB): a
mixture logged it whole in its warning at every call (and a refusal's text went whole into its exceptions), so that a
few such experts wrote hundreds of megabytes of log per minute of training. Their texts are now cut short."""

import logging

import pytest
import torch
import torch.nn as nn
from moe_client_fakes import FakeExpertServer

from hivemind.dht import DHT
from hivemind.moe import RemoteMixtureOfExperts

HID = 4
LONG = 1024**2


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["RuntimeError", "InvalidInputsError"])
def test_megabytes_of_error_text_from_an_expert_are_cut_short(caplog, kind):
    server = FakeExpertServer({"ffn.0": nn.Linear(HID, HID), "ffn.1": nn.Linear(HID, HID)}, HID)
    error_type = type(kind, (RuntimeError,), {})

    async def verbose_failure(uid, inputs):
        raise error_type("x" * LONG)

    server.handler._forward = verbose_failure
    client_dht = DHT(start=True, initial_peers=server.dht.get_visible_maddrs(), host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    try:
        moe = RemoteMixtureOfExperts(in_features=HID, grid_size=(2,), dht=client_dht, uid_prefix="ffn.", k_best=2)
        with caplog.at_level(logging.WARNING), pytest.raises((TimeoutError, ValueError)) as error_info:
            moe(torch.randn(3, HID))
        warnings = [record.getMessage() for record in caplog.records if "ffn." in record.getMessage()]
        assert warnings and all(len(message) < 4096 for message in warnings), [len(m) for m in warnings]
        assert len(str(error_info.value)) < 4096
    finally:
        client_dht.shutdown()
        server.stop()


@pytest.mark.timeout(60)
def test_a_remote_expert_raises_a_hostile_error_text_cut_short_and_named():
    from hivemind.moe.server.dht_handler import get_experts
    from hivemind.p2p import P2PHandlerError

    server = FakeExpertServer({"ffn.0": nn.Linear(HID, HID)}, HID)

    async def verbose_failure(uid, inputs):
        raise RuntimeError("x" * LONG)

    server.handler._forward = verbose_failure
    client_dht = DHT(start=True, initial_peers=server.dht.get_visible_maddrs(), host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    try:
        (expert,) = get_experts(client_dht, ["ffn.0"])
        with pytest.raises(P2PHandlerError) as error_info:
            expert(torch.randn(3, HID))
        message = str(error_info.value)
        assert len(message) < 4096 and message.startswith("forward of expert 'ffn.0' at "), message[:200]
    finally:
        client_dht.shutdown()
        server.stop()


@pytest.mark.timeout(60)
def test_a_hostile_error_text_in_answer_to_rpc_info_is_cut_short():
    from hivemind.moe.server.dht_handler import get_experts
    from hivemind.p2p import P2PHandlerError

    server = FakeExpertServer({"ffn.0": nn.Linear(HID, HID)}, HID)

    def verbose_lookup(uid):
        raise KeyError("x" * LONG)

    server.handler._module = verbose_lookup
    client_dht = DHT(start=True, initial_peers=server.dht.get_visible_maddrs(), host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    try:
        (expert,) = get_experts(client_dht, ["ffn.0"])
        with pytest.raises(P2PHandlerError) as error_info:
            _ = expert.info
        message = str(error_info.value)
        assert len(message) < 4096 and message.startswith("cannot get the schema of expert 'ffn.0'"), message[:200]
    finally:
        client_dht.shutdown()
        server.stop()
