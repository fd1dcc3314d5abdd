"""MSGPackSerializer.loads bounds the number of items of a document: one byte of msgpack (an empty map or array)
becomes ~70 bytes of Python objects, so a peer's 32 MiB of them took 2.5 GB before anything looked at them."""

import tracemalloc

import pytest

from hivemind.dht.request_checks import check_store_item
from hivemind.dht.routing import DHTID
from hivemind.utils.serializer import MSGPackDecodeError, MSGPackSerializer
from hivemind.utils.timed_storage import get_dht_time

MAX_ITEMS = 2**20  # MSGPackSerializer.MAX_ITEMS


def array_of(count: int, item: bytes) -> bytes:
    """msgpack array32 of ``count`` copies of the already-encoded ``item``."""
    return b"\xdd" + count.to_bytes(4, "big") + item * count


def test_more_empty_maps_than_max_items_are_refused():
    with pytest.raises(MSGPackDecodeError, match="items"):
        MSGPackSerializer.loads(array_of(MAX_ITEMS + 1000, b"\x80"))


@pytest.mark.parametrize(
    "item", [b"\x80", b"\x90", b"\x81\xc0\xc0", b"\xd4\x40\x90"], ids=["map", "array", "pair", "tuple"]
)
def test_refusal_comes_before_the_containers_take_memory(monkeypatch, item):
    monkeypatch.setattr(MSGPackSerializer, "MAX_ITEMS", raising=False, value=2**14)
    document = b"\xdc" + (2**6).to_bytes(2, "big") + array_of(2**12, item) * 2**6  # 2**18 items, 2**12 per array
    tracemalloc.start()
    try:
        with pytest.raises(MSGPackDecodeError, match="items"):
            MSGPackSerializer.loads(document)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * len(document), f"decoding {len(document)} bytes took {peak} bytes before the refusal"


def test_documents_within_the_limit_decode_as_before():
    pairs = [[i, i] for i in range(2**17)]  # 2**17 arrays of 2 elements, each also an element: 2**19 items
    assert MSGPackSerializer.loads(MSGPackSerializer.dumps(pairs)) == pairs
    mapping = {i: (i, str(i)) for i in range(2**16)}
    assert MSGPackSerializer.loads(MSGPackSerializer.dumps(mapping)) == mapping


def test_tuples_and_nested_ext_payloads_spend_the_same_budget(monkeypatch):
    from hivemind.dht.storage import DictionaryDHTValue

    monkeypatch.setattr(MSGPackSerializer, "MAX_ITEMS", raising=False, value=2**12)
    expiration = get_dht_time() + 100
    dictionary = DictionaryDHTValue()
    for subkey in range(400):  # ~1600 items: within the limit on its own
        dictionary.store(subkey, b"", expiration)
    single = MSGPackSerializer.dumps(dictionary)
    assert len(MSGPackSerializer.loads(single)) == 400
    with pytest.raises(MSGPackDecodeError, match="items"):
        MSGPackSerializer.loads(MSGPackSerializer.dumps([dictionary] * 8))
    with pytest.raises(MSGPackDecodeError, match="items"):
        MSGPackSerializer.loads(MSGPackSerializer.dumps(tuple((i, i) for i in range(2**12))))


def test_dht_store_refuses_a_value_of_too_many_items():
    now = get_dht_time()
    value = array_of(MAX_ITEMS + 1, b"\x90")  # 1 MiB: fits a store request
    key = DHTID.generate("key").to_bytes()
    assert check_store_item(key, b"\xc0", value, now + 10, now) == "malformed_value"
