"""
A find answer carries a key's whole dictionary (up to 1 MiB). Reading it encoded every subkey again, twice (for the
record validator and for the dictionary's size), so an answer of deeply nested tuple subkeys (each tuple a Python call
to encode) cost the reading node three times what decoding it costs (3.3 s for 1 MiB); the subkeys are taken from the
answer's bytes instead, and reading it costs about one decoding.
CPU time is measured (time.process_time), not wall time.
"""

import functools
import time

import msgpack
import pytest

from hivemind.dht.protocol import DHTProtocol
from hivemind.dht.routing import DHTID
from hivemind.dht.storage import DictionaryDHTValue
from hivemind.utils.serializer import MSGPackSerializer
from hivemind.utils.timed_storage import get_dht_time

pytestmark = pytest.mark.usefixtures("frozen_heap")  # CPU-time bounds: see conftest.frozen_heap


@functools.cache
def nested_tuple(depth: int, leaf: int) -> bytes:
    """msgpack of ((...((leaf,),)...),) with ``depth`` tuples, as MSGPackSerializer encodes it."""
    encoded = MSGPackSerializer.dumps(leaf)
    for _ in range(depth):
        encoded = msgpack.packb(msgpack.ExtType(0x40, b"\x91" + encoded))
    return encoded


def dictionary_answer(subkeys, expirations) -> bytes:
    """The ext 0x50 bytes of a dictionary with these encoded subkeys (each value: msgpack None)."""
    entries = b"".join(
        b"\x93" + subkey + msgpack.packb(b"\xc0") + msgpack.packb(float(expiration))
        for subkey, expiration in zip(subkeys, expirations)
    )
    payload = b"\x93" + msgpack.packb(float("inf")) + msgpack.packb(float(max(expirations)))
    payload += b"\xdd" + len(subkeys).to_bytes(4, "big") + entries
    return msgpack.packb(msgpack.ExtType(0x50, payload))


@pytest.fixture
async def reader(p2p_factory):
    protocol = await DHTProtocol.create(await p2p_factory(), DHTID.generate(), 20, 5, 5, wait_timeout=10)
    yield protocol
    await protocol.shutdown()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("with_expired_entry", [False, True], ids=["all live", "one entry expired"])
async def test_a_find_answer_of_nested_tuple_subkeys_is_read_quickly(reader, with_expired_entry):
    now = get_dht_time()
    subkeys = [nested_tuple(61, index) for index in range(4000)]  # about 1 MiB, as a replica may hold
    expirations = [now + 600] * len(subkeys)
    if with_expired_entry:
        expirations[0] = now - 10
    answer = dictionary_answer(subkeys, expirations)
    assert 0.8 * 2**20 < len(answer) < 1.1 * 2**20
    started = time.process_time()
    MSGPackSerializer.loads(answer)  # what decoding the answer costs: the least that reading it may cost
    decoding = time.process_time() - started
    started = time.process_time()
    dictionary = reader._parse_dictionary(DHTID.generate("key").to_bytes(), answer, now)
    spent = time.process_time() - started
    assert isinstance(dictionary, DictionaryDHTValue) and len(dictionary) == len(subkeys) - with_expired_entry
    assert dictionary.nbytes >= sum(
        DictionaryDHTValue.entry_nbytes(subkey, item.value) for subkey, item in dictionary.items()
    )
    assert spent < 1.5 * decoding + 0.2, (
        f"reading a {len(answer)}-byte answer took {spent:.2f} s of CPU, decoding it {decoding:.2f}"
    )


@pytest.mark.timeout(60)
async def test_equal_subkeys_of_different_encodings_in_a_find_answer_count_as_the_one_held(reader):
    now = get_dht_time()
    for first, second in [(1.0, 1), (1, 1.0), (True, 1.0), (2.5, (2.5,))]:
        subkeys = [MSGPackSerializer.dumps(first), MSGPackSerializer.dumps(second), MSGPackSerializer.dumps("x")]
        for expirations in ([now + 100, now + 200, now + 300], [now - 1, now + 200, now + 300]):
            dictionary = reader._parse_dictionary(b"k" * 20, dictionary_answer(subkeys, expirations), now)
            held = [subkey for subkey, _ in dictionary.items()]
            assert dictionary.nbytes == sum(
                DictionaryDHTValue.entry_nbytes(subkey, item.value) for subkey, item in dictionary.items()
            ), (first, second, held)
            assert dictionary.decoded_positions is None
