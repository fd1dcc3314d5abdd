"""
Per-key limits of DHT dictionaries (a key inflated by many subkey stores stays readable), whole-dictionary stores
that store nothing, and DictionaryDHTValue encodings that must decode and encode back to the same bytes.
"""

import math

import msgpack
import pytest

from hivemind.dht.protocol import DHTProtocol
from hivemind.dht.request_checks import MAX_FIND_RESPONSE_VALUE_BYTES
from hivemind.dht.routing import DHTID
from hivemind.dht.storage import (
    MAX_DICTIONARY_BYTES,
    MAX_DICTIONARY_ENTRIES,
    DHTLocalStorage,
    DictionaryDHTValue,
)
from hivemind.p2p import P2P
from hivemind.proto import dht_pb2
from hivemind.utils.serializer import MSGPackSerializer
from hivemind.utils.timed_storage import get_dht_time

try:
    from hypothesis import given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover - hypothesis is a dev requirement
    st = None

KEY = DHTID.generate("inflated")
BIG_VALUE = MSGPackSerializer.dumps(b"x" * 60_000)


def dictionary_payload(maxsize, latest: float, entries) -> bytes:
    """The ext-0x50 bytes of a dictionary, encoded by hand as a peer would send them."""
    return MSGPackSerializer.dumps(
        msgpack.ExtType(0x50, MSGPackSerializer.dumps([maxsize, latest, [list(entry) for entry in entries]]))
    )


# ---------------------------------------------------------------- every decodable dictionary encodes back


@pytest.mark.parametrize("maxsize", [0, 7, 2**64 - 1, 1e300, 5.5, math.inf])
def test_dictionary_maxsize_encodes_back_to_the_same_bytes(maxsize):
    expiration = get_dht_time() + 600
    encoded = dictionary_payload(maxsize, expiration, [("sub", b"\xc3", expiration)] if maxsize >= 1 else [])
    decoded = MSGPackSerializer.loads(encoded)
    assert isinstance(decoded, DictionaryDHTValue)
    assert MSGPackSerializer.dumps(decoded) == encoded


def test_spec_vector_of_a_dictionary_round_trips():
    vector = bytes.fromhex("c7255093cb7ff0000000000000cb41edcd65000000009193a3737562c401c3cb41edcd6500000000")
    assert MSGPackSerializer.dumps(MSGPackSerializer.loads(vector)) == vector


if st is not None:  # a property test where hypothesis is installed; the cases above otherwise
    _subkeys = st.recursive(
        st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text(max_size=8) | st.binary(max_size=8),
        lambda inner: st.lists(inner, max_size=3).map(tuple),
        max_leaves=6,
    )
    _entries = st.lists(
        st.tuples(_subkeys, st.binary(max_size=32), st.floats(100, 10_000)), max_size=8, unique_by=lambda e: e[0]
    )

    @settings(max_examples=150, deadline=None)
    @given(entries=_entries, maxsize=st.one_of(st.just(math.inf), st.integers(8, 2**64 - 1), st.floats(8, 1e300)))
    def test_any_dictionary_decodes_and_encodes_back(entries, maxsize):
        now = get_dht_time()
        entries = [(subkey, value, now + offset) for subkey, value, offset in entries]
        latest = max([expiration for *_, expiration in entries], default=-math.inf)
        encoded = dictionary_payload(maxsize, latest, entries)
        decoded = MSGPackSerializer.loads(encoded)
        assert {subkey: (item.value, item.expiration_time) for subkey, item in decoded.items()} == {
            subkey: (value, expiration) for subkey, value, expiration in entries
        }
        assert MSGPackSerializer.dumps(decoded) == encoded
        assert MSGPackSerializer.dumps(MSGPackSerializer.loads(MSGPackSerializer.dumps(decoded))) == encoded


# ---------------------------------------------------------------- per-key limits in local storage


def test_dictionary_refuses_new_subkeys_beyond_the_entry_limit():
    storage, expiration = DHTLocalStorage(), get_dht_time() + 600
    for index in range(MAX_DICTIONARY_ENTRIES):
        assert storage.store(KEY, b"\xc3", expiration, subkey=index)
    assert not storage.store(KEY, b"\xc3", expiration, subkey="one too many")
    assert storage.dictionary_full(KEY, "one too many", b"\xc3")
    assert storage.store(KEY, b"\xc2", expiration + 1, subkey=0)  # an existing subkey may still be updated
    assert len(storage.get(KEY).value) == MAX_DICTIONARY_ENTRIES


def test_dictionary_refuses_entries_beyond_the_byte_limit():
    storage, expiration = DHTLocalStorage(), get_dht_time() + 600
    fitting = MAX_DICTIONARY_BYTES // DictionaryDHTValue.entry_nbytes(0, BIG_VALUE)
    for index in range(fitting):
        assert storage.store(KEY, BIG_VALUE, expiration, subkey=index)
    assert not storage.store(KEY, BIG_VALUE, expiration, subkey=fitting)
    assert storage.store(KEY, b"\xc3", expiration, subkey="small")  # what still fits is accepted
    assert storage.get(KEY).value.nbytes <= MAX_DICTIONARY_BYTES
    assert len(MSGPackSerializer.dumps(storage.get(KEY).value)) <= MAX_DICTIONARY_BYTES


def test_single_entry_beyond_the_byte_limit_is_refused():
    storage = DHTLocalStorage()
    assert not storage.store(KEY, b"x" * MAX_DICTIONARY_BYTES, get_dht_time() + 600, subkey="huge")
    assert storage.get(KEY) is None


def test_storing_an_empty_dictionary_is_not_a_success():
    assert not DHTLocalStorage().store(KEY, DictionaryDHTValue(), get_dht_time() + 600)


# ---------------------------------------------------------------- over the network


@pytest.fixture
async def server_and_caller():
    p2p_server = await P2P.create()
    p2p_caller = await P2P.create(initial_peers=await p2p_server.get_visible_maddrs())
    server = await DHTProtocol.create(p2p_server, DHTID.generate(), 20, 5, 5, wait_timeout=10)
    caller = await DHTProtocol.create(p2p_caller, DHTID.generate(), 20, 5, 5, wait_timeout=10)
    yield server, caller
    for item in (caller, server, p2p_caller, p2p_server):
        await item.shutdown()


def raw_store(keys, subkeys, values, expirations):
    return dht_pb2.StoreRequest(
        keys=keys, subkeys=subkeys, values=values, expiration_time=expirations, peer=dht_pb2.NodeInfo()
    )


@pytest.mark.timeout(60)
@pytest.mark.parametrize("expiration_offset", [math.nan, -10.0])
async def test_whole_dictionary_whose_entries_are_all_dropped_reports_failure(server_and_caller, expiration_offset):
    server, caller = server_and_caller
    now = get_dht_time()
    entries = [("a", b"\xc3", now + expiration_offset), ("b", b"\xc2", now + expiration_offset)]
    request = raw_store([KEY.to_bytes()], [b""], [dictionary_payload(math.inf, now + 60, entries)], [now + 60])
    response = await DHTProtocol.get_stub(caller.p2p, server.p2p.peer_id).rpc_store(request)
    assert list(response.store_ok) == [False]
    assert server.storage.get(KEY) is None and server.rejected["dropped_dictionary_entry"] == 2


@pytest.mark.timeout(60)
async def test_inflated_key_still_returns_the_subkeys_written_before(server_and_caller):
    server, caller = server_and_caller
    now, stub = get_dht_time(), DHTProtocol.get_stub(caller.p2p, server.p2p.peer_id)
    honest = MSGPackSerializer.dumps("honest")
    assert await caller.call_store(server.p2p.peer_id, [KEY, KEY], [honest, honest], now + 300, ["a", "b"])
    flood = [MSGPackSerializer.dumps(f"flood-{index}") for index in range(80)]  # 80 x 60 KB: 4.8 MB in all
    for start in range(0, len(flood), 10):
        batch = flood[start : start + 10]
        await stub.rpc_store(raw_store([KEY.to_bytes()] * 10, batch, [BIG_VALUE] * 10, [now + 600] * 10))
    assert server.rejected["dictionary_full"] > 0
    found = await caller.call_find(server.p2p.peer_id, [KEY])
    assert found is not None, "the key's find response no longer fits in a message"
    dictionary = found[KEY][0].value
    assert dictionary.get("a").value == honest and dictionary.get("b").value == honest


@pytest.mark.timeout(60)
async def test_find_of_several_full_keys_answers_what_fits(server_and_caller):
    server, caller = server_and_caller
    now, stub = get_dht_time(), DHTProtocol.get_stub(caller.p2p, server.p2p.peer_id)
    keys = [DHTID.generate(f"full-{index}") for index in range(5)]  # 5 x 1 MiB: more than one 4 MiB message
    fitting = MAX_DICTIONARY_BYTES // DictionaryDHTValue.entry_nbytes(0, BIG_VALUE)
    for key in keys:
        subkeys = [MSGPackSerializer.dumps(index) for index in range(fitting)]
        request = raw_store([key.to_bytes()] * fitting, subkeys, [BIG_VALUE] * fitting, [now + 600] * fitting)
        assert all((await stub.rpc_store(request)).store_ok)
    found = await caller.call_find(server.p2p.peer_id, keys)
    assert found is not None, "the find response no longer fits in a message"
    answered = [key for key in keys if found[key][0] is not None]
    assert len(answered) == MAX_FIND_RESPONSE_VALUE_BYTES // MAX_DICTIONARY_BYTES == 3
    for left_out in set(keys) - set(answered):  # each can be asked for on its own
        assert (await caller.call_find(server.p2p.peer_id, [left_out]))[left_out][0] is not None
