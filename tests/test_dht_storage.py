"""Local DHT storage: DictionaryDHTValue (ext 0x50) and every rule for which incoming value wins."""

import math
import pickle

import pytest

from hivemind.dht.routing import DHTID
from hivemind.dht.storage import CacheRefreshQueue, DHTLocalStorage, DictionaryDHTValue
from hivemind.utils.serializer import MSGPackSerializer
from hivemind.utils.timed_storage import get_dht_time

KEY = DHTID.generate("key")


@pytest.fixture
def storage():
    return DHTLocalStorage()


def dictionary_of(storage: DHTLocalStorage, key=KEY) -> dict:
    entry = storage.get(key)
    assert entry is not None and isinstance(entry.value, DictionaryDHTValue)
    return {subkey: tuple(item) for subkey, item in entry.value.items()}


def test_dictionary_value_msgpack_vector():
    value = DictionaryDHTValue()
    value.store("sub", b"\xc3", 4e9)
    encoded = MSGPackSerializer.dumps(value)
    assert encoded.hex() == "c7255093cb7ff0000000000000cb41edcd65000000009193a3737562c401c3cb41edcd6500000000"
    decoded = MSGPackSerializer.loads(encoded)
    assert isinstance(decoded, DictionaryDHTValue)
    assert decoded.get("sub") == (b"\xc3", 4e9) and decoded.latest_expiration_time == 4e9
    assert math.isinf(decoded.maxsize)


def test_dictionary_value_with_maxsize_encodes_it_as_int():
    value = DictionaryDHTValue(maxsize=3)
    value.store(("tuple", 1), b"x", 4e9)
    payload = MSGPackSerializer.loads(value.packb())
    assert payload[0] == 3 and isinstance(payload[0], int)
    decoded = DictionaryDHTValue.unpackb(value.packb())
    assert decoded.maxsize == 3 and decoded.get(("tuple", 1)) == (b"x", 4e9)


def test_dictionary_value_serialization_drops_expired_entries():
    now = get_dht_time()
    value = DictionaryDHTValue()
    with value.freeze():  # a frozen storage accepts an already expired entry
        value.store("expired", b"1", now - 1)
    value.store("live", b"2", now + 100)
    decoded = DictionaryDHTValue.unpackb(value.packb())
    assert [subkey for subkey, _ in decoded.items()] == ["live"]


def test_dictionary_value_latest_expiration_tracks_maximum():
    value = DictionaryDHTValue()
    assert value.latest_expiration_time == -math.inf
    value.store("a", b"1", 4e9)
    value.store("b", b"2", 3e9)
    assert value.latest_expiration_time == 4e9


@pytest.mark.parametrize(
    "payload",
    [
        [math.inf, 4e9],  # wrong length
        ["inf", 4e9, []],  # non-numeric maxsize
        [math.inf, 4e9, [["sub", "not bytes", 4e9]]],
        [math.inf, 4e9, [["sub", b"x"]]],
        [math.inf, 4e9, [[["unhashable"], b"x", 4e9]]],
        [math.inf, "later", []],
        {"not": "a list"},
    ],
)
def test_malformed_dictionary_payload_is_rejected_with_value_error(payload):
    with pytest.raises(ValueError):
        DictionaryDHTValue.unpackb(MSGPackSerializer.dumps(payload))


# --- acceptance rules (existing entry x incoming value), one test each ---


def test_row_any_entry_with_past_expiration_is_never_accepted(storage):
    past = get_dht_time() - 1
    assert not storage.store(KEY, b"v", past)
    assert not storage.store(KEY, b"v", past, subkey="s")
    assert storage.get(KEY) is None


def test_nan_expiration_is_rejected(storage):
    assert not storage.store(KEY, b"v", math.nan)
    assert not storage.store(KEY, b"v", math.nan, subkey="s")
    assert storage.get(KEY) is None


def test_row_regular_value_onto_nothing_is_stored(storage):
    expiration = get_dht_time() + 10
    assert storage.store(KEY, b"v", expiration)
    assert storage.get(KEY) == (b"v", expiration)


def test_row_regular_value_replaces_regular_only_if_strictly_newer(storage):
    now = get_dht_time()
    assert storage.store(KEY, b"old", now + 10)
    assert not storage.store(KEY, b"equal", now + 10)
    assert not storage.store(KEY, b"older", now + 5)
    assert storage.get(KEY) == (b"old", now + 10)
    assert storage.store(KEY, b"new", now + 11)
    assert storage.get(KEY) == (b"new", now + 11)


def test_row_regular_value_replaces_dictionary_only_if_newer_than_its_latest_entry(storage):
    now = get_dht_time()
    storage.store(KEY, b"a", now + 10, subkey="a")
    storage.store(KEY, b"b", now + 20, subkey="b")
    assert not storage.store(KEY, b"regular", now + 20)
    assert not storage.store(KEY, b"regular", now + 15)
    assert dictionary_of(storage) == {"a": (b"a", now + 10), "b": (b"b", now + 20)}
    assert storage.store(KEY, b"regular", now + 21)
    assert storage.get(KEY) == (b"regular", now + 21)


def test_row_subkey_entry_onto_nothing_creates_a_dictionary(storage):
    expiration = get_dht_time() + 10
    assert storage.store(KEY, b"v", expiration, subkey="s")
    assert dictionary_of(storage) == {"s": (b"v", expiration)}
    assert storage.get(KEY).expiration_time == expiration


def test_row_subkey_entry_replaces_regular_value_only_if_strictly_newer(storage):
    now = get_dht_time()
    storage.store(KEY, b"regular", now + 10)
    assert not storage.store(KEY, b"v", now + 10, subkey="s")
    assert not storage.store(KEY, b"v", now + 5, subkey="s")
    assert storage.get(KEY) == (b"regular", now + 10)
    assert storage.store(KEY, b"v", now + 11, subkey="s")
    assert dictionary_of(storage) == {"s": (b"v", now + 11)}


def test_row_subkey_entry_into_dictionary_is_added_when_absent(storage):
    now = get_dht_time()
    storage.store(KEY, b"a", now + 20, subkey="a")
    assert storage.store(KEY, b"b", now + 10, subkey="b")  # older than the dictionary, but a new subkey
    assert dictionary_of(storage) == {"a": (b"a", now + 20), "b": (b"b", now + 10)}
    assert storage.get(KEY).expiration_time == now + 20


def test_row_subkey_entry_into_dictionary_replaces_same_subkey_only_if_strictly_newer(storage):
    now = get_dht_time()
    storage.store(KEY, b"old", now + 10, subkey="s")
    assert not storage.store(KEY, b"equal", now + 10, subkey="s")
    assert not storage.store(KEY, b"older", now + 5, subkey="s")
    assert dictionary_of(storage) == {"s": (b"old", now + 10)}
    assert storage.store(KEY, b"new", now + 12, subkey="s")
    assert dictionary_of(storage) == {"s": (b"new", now + 12)}


def test_row_subkey_entry_raises_dictionary_expiration(storage):
    now = get_dht_time()
    storage.store(KEY, b"a", now + 10, subkey="a")
    storage.store(KEY, b"b", now + 30, subkey="b")
    assert storage.get(KEY).expiration_time == now + 30
    assert storage.get(KEY).value.latest_expiration_time == now + 30


def test_row_whole_dictionary_is_merged_entry_by_entry(storage):
    now = get_dht_time()
    storage.store(KEY, b"mine", now + 20, subkey="a")
    incoming = DictionaryDHTValue()
    incoming.store("a", b"theirs", now + 30)
    incoming.store("b", b"theirs", now + 10)
    assert storage.store(KEY, incoming, incoming.latest_expiration_time)
    assert dictionary_of(storage) == {"a": (b"theirs", now + 30), "b": (b"theirs", now + 10)}


def test_row_whole_dictionary_result_is_false_if_any_entry_is_rejected(storage):
    now = get_dht_time()
    storage.store(KEY, b"mine", now + 20, subkey="a")
    incoming = DictionaryDHTValue()
    incoming.store("a", b"theirs", now + 15)
    incoming.store("b", b"theirs", now + 10)
    assert not storage.store(KEY, incoming, incoming.latest_expiration_time)
    assert dictionary_of(storage) == {"a": (b"mine", now + 20), "b": (b"theirs", now + 10)}


def test_whole_dictionary_onto_regular_value_follows_subkey_rules(storage):
    now = get_dht_time()
    storage.store(KEY, b"regular", now + 20)
    incoming = DictionaryDHTValue()
    incoming.store("a", b"1", now + 30)
    assert storage.store(KEY, incoming, incoming.latest_expiration_time)
    assert dictionary_of(storage) == {"a": (b"1", now + 30)}


def test_stored_dictionary_is_a_copy_of_the_incoming_one(storage):
    now = get_dht_time()
    incoming = DictionaryDHTValue()
    incoming.store("a", b"1", now + 30)
    storage.store(KEY, incoming, incoming.latest_expiration_time)
    incoming.store("b", b"2", now + 40)
    assert dictionary_of(storage) == {"a": (b"1", now + 30)}


def test_storage_with_maxsize_evicts_earliest_expiring_key():
    cache = DHTLocalStorage(maxsize=2)
    now = get_dht_time()
    keys = [DHTID.generate(i) for i in range(3)]
    cache.store(keys[0], b"0", now + 30)
    cache.store(keys[1], b"1", now + 10)
    cache.store(keys[2], b"2", now + 20)
    assert keys[1] not in cache and keys[0] in cache and keys[2] in cache


def test_cache_refresh_queue_pops_keys_when_due():
    queue = CacheRefreshQueue(refresh_before_expiry=5)
    a, b, c = (DHTID.generate(name) for name in "abc")
    queue.push(a, 100)
    queue.push(b, 50)
    queue.push(c, 70)
    assert queue.next_refresh_time() == 45
    assert queue.pop_due(now=40) == []
    assert queue.pop_due(now=65) == [b, c]
    assert len(queue) == 1 and a in queue
    assert queue.pop_due(now=1000) == [a]
    assert queue.next_refresh_time() is None


def test_cache_refresh_queue_reschedules_and_discards():
    queue = CacheRefreshQueue(refresh_before_expiry=5)
    a, b = DHTID.generate("a"), DHTID.generate("b")
    queue.push(a, 10)
    queue.push(a, 100)
    queue.push(b, 20)
    queue.discard(b)
    assert queue.pop_due(now=50) == []
    assert queue.pop_due(now=95, limit=5) == [a]
    assert len(queue) == 0


def test_cache_refresh_queue_respects_limit():
    queue = CacheRefreshQueue(refresh_before_expiry=0)
    keys = [DHTID.generate(i) for i in range(5)]
    for i, key in enumerate(keys):
        queue.push(key, i)
    assert queue.pop_due(now=10, limit=2) == keys[:2]
    assert queue.pop_due(now=10) == keys[2:]


def test_dictionary_value_survives_pickling():
    value = DictionaryDHTValue()
    value.store("a", b"1", 4e9)
    restored = pickle.loads(pickle.dumps(value))
    assert restored.get("a") == (b"1", 4e9) and restored.latest_expiration_time == 4e9


def test_whole_dictionary_with_an_expired_entry_stores_the_live_ones(storage):
    now = get_dht_time()
    incoming = DictionaryDHTValue()
    with incoming.freeze():  # a frozen storage accepts an already expired entry
        incoming.store("expired", b"0", now - 1)
    incoming.store("live", b"1", now + 10)
    assert storage.store(KEY, incoming, incoming.latest_expiration_time)
    assert dictionary_of(storage) == {"live": (b"1", now + 10)}
