"""Names that code written for hivemind 1.1.12 imports, with the meaning they have there (observed by running it)."""

import dataclasses
import heapq

import pytest
import torch

import hivemind.compression.base as compression_base
from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.p2p.p2p_daemon_bindings.control import parse_conn_protocol
from hivemind.utils.mpfuture import ALL_STATES
from hivemind.utils.multiaddr import Multiaddr
from hivemind.utils.networking import LOCALHOST
from hivemind.utils.timed_storage import HeapEntry


def test_all_states_lists_future_states_in_the_original_order():
    # petals 2.2.0 stores ALL_STATES.index(state) as a state code, so the order is part of the contract
    assert ALL_STATES == ("PENDING", "RUNNING", "FINISHED", "CANCELLED", "CANCELLED_AND_NOTIFIED")


def test_localhost_is_the_ipv4_loopback_address():
    assert LOCALHOST == "127.0.0.1"


def test_heap_entry_is_a_frozen_dataclass_ordered_by_expiration_then_key():
    assert [field.name for field in dataclasses.fields(HeapEntry)] == ["expiration_time", "key"]
    heap = [HeapEntry(3.0, "c"), HeapEntry(1.0, "z"), HeapEntry(1.0, "a")]
    heapq.heapify(heap)
    assert [heapq.heappop(heap).key for _ in range(3)] == ["a", "z", "c"]
    assert HeapEntry(1.0, "k") == HeapEntry(1.0, "k") and hash(HeapEntry(1.0, "k")) == hash(HeapEntry(1.0, "k"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        HeapEntry(1.0, "k").key = "other"


@pytest.mark.parametrize(
    "maddr, code",
    [("/ip4/127.0.0.1/tcp/1234", 4), ("/unix/tmp/p2pd.sock", 400), ("/ip4/127.0.0.1/udp/1/quic", 4)],
)
def test_parse_conn_protocol_returns_the_ip4_or_unix_code(maddr, code):
    assert parse_conn_protocol(Multiaddr(maddr)) == code


@pytest.mark.parametrize("maddr", ["/ip6/::1/tcp/5", "/dns4/example.org/tcp/5", "/ip4/1.2.3.4/tcp/1/unix/x"])
def test_parse_conn_protocol_refuses_addresses_without_exactly_one_of_them(maddr):
    with pytest.raises(ValueError, match="exactly one"):
        parse_conn_protocol(Multiaddr(maddr))


def test_assigning_use_legacy_bfloat16_switches_bfloat16_encoding(monkeypatch):
    # petals 2.2.0 sets hivemind.compression.base.USE_LEGACY_BFLOAT16 = False when the variable is not set
    monkeypatch.delenv("USE_LEGACY_BFLOAT16", raising=False)
    tensor = torch.randn(5, 3).bfloat16()
    monkeypatch.setattr(compression_base, "USE_LEGACY_BFLOAT16", False)
    serialized = serialize_torch_tensor(tensor)
    assert serialized.dtype == "bfloat16" and len(serialized.buffer) == 2 * tensor.numel()
    assert torch.equal(deserialize_torch_tensor(serialized), tensor)


def test_tensor_role_is_importable_from_the_state_averager_module():
    # 1.1.12's state averager module imports TensorRole and code written for it imports the name from there
    from hivemind.compression import TensorRole
    from hivemind.optim.state_averager import TensorRole as from_state_averager

    assert from_state_averager is TensorRole
