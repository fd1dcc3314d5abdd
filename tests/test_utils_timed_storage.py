import pickle
import time

import pytest

from hivemind.utils import timed_storage
from hivemind.utils.timed_storage import (
    MAX_DHT_TIME_DISCREPANCY_SECONDS,
    TimedStorage,
    ValueWithExpiration,
    get_dht_time,
)


def test_get_dht_time_is_unix_time():
    assert abs(get_dht_time() - time.time()) < 1
    assert MAX_DHT_TIME_DISCREPANCY_SECONDS == 3


def test_value_with_expiration_behaves_like_a_tuple():
    item = ValueWithExpiration("v", 123.0)
    value, expiration = item
    assert (value, expiration) == ("v", 123.0)
    assert item[0] == "v" and item[1] == 123.0 and item[-1] == 123.0
    assert item == ("v", 123.0) and ("v", 123.0) == item
    assert item == ValueWithExpiration("v", 123.0) and item != ValueWithExpiration("v", 124.0)
    assert hash(item) == hash(("v", 123.0))
    assert pickle.loads(pickle.dumps(item)) == item
    with pytest.raises(AttributeError):
        item.value = "other"


def test_store_and_get():
    storage = TimedStorage()
    assert storage.store("key", "value", get_dht_time() + 10)
    assert storage.get("key").value == "value"
    assert "key" in storage and len(storage) == 1
    assert storage.get("missing") is None


def test_storing_none_is_distinguishable_from_missing():
    storage = TimedStorage()
    assert storage.store("key", None, get_dht_time() + 10)
    assert storage.get("key") is not None and storage.get("key").value is None


def test_past_expiration_is_refused():
    storage = TimedStorage()
    assert not storage.store("key", "value", get_dht_time() - 1)
    assert "key" not in storage


def test_only_strictly_newer_expiration_replaces():
    storage = TimedStorage()
    expiration = get_dht_time() + 10
    assert storage.store("key", "first", expiration)
    assert not storage.store("key", "same-time", expiration)
    assert not storage.store("key", "older", expiration - 1)
    assert storage.get("key") == ("first", expiration)
    assert storage.store("key", "newer", expiration + 1)
    assert storage.get("key") == ("newer", expiration + 1)


class FakeClock:
    """The storage's DHT time, moved by hand: an expiry 50 ms ahead, then a sleep, failed whenever a loaded machine
    paused the test for 50 ms between reading the time and storing."""

    def __init__(self, now: float = 1_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(timed_storage, "get_dht_time", fake)
    return fake


def test_entries_expire(clock):
    storage = TimedStorage()
    storage.store("short", 1, clock.now + 0.05)
    storage.store("long", 2, clock.now + 10)
    clock.now += 0.1
    assert storage.get("short") is None and "short" not in storage
    assert len(storage) == 1 and [key for key, _ in storage.items()] == ["long"]


def test_expired_entry_does_not_block_new_store(clock):
    storage = TimedStorage()
    storage.store("key", "old", clock.now + 0.05)
    clock.now += 0.1
    assert storage.store("key", "new", clock.now + 0.06)


def test_freeze_keeps_expired_entries_until_thawed(clock):
    storage = TimedStorage()
    assert storage.store("key", "value", clock.now + 0.05)
    with storage.freeze():
        clock.now += 0.1
        assert storage.get("key").value == "value"
        assert len(storage) == 1
    assert storage.get("key") is None


def test_top_is_the_earliest_expiring_entry():
    storage = TimedStorage()
    assert storage.top() == (None, None)
    now = get_dht_time()
    storage.store("b", 2, now + 20)
    storage.store("a", 1, now + 10)
    storage.store("c", 3, now + 30)
    assert storage.top() == ("a", ValueWithExpiration(1, now + 10))
    storage.store("a", 1, now + 40)  # replacing moves it to the end
    assert storage.top()[0] == "b"
    del storage["b"]
    assert storage.top()[0] == "c"


def test_maxsize_evicts_earliest_expiring():
    storage = TimedStorage(maxsize=2)
    now = get_dht_time()
    assert storage.store("a", 1, now + 10)
    assert storage.store("b", 2, now + 20)
    assert storage.store("c", 3, now + 30)
    assert len(storage) == 2 and "a" not in storage
    assert not storage.store("d", 4, now + 5)  # would be evicted at once
    assert sorted(key for key, _ in storage.items()) == ["b", "c"]


def test_delete_clear_and_bool():
    storage = TimedStorage()
    assert not storage
    storage.store("a", 1, get_dht_time() + 10)
    assert storage
    del storage["a"]
    assert "a" not in storage and not storage
    with pytest.raises(KeyError):
        del storage["a"]
    storage.store("b", 1, get_dht_time() + 10)
    storage.clear()
    assert len(storage) == 0 and storage.top() == (None, None)


def test_keys_of_incomparable_types_with_equal_expirations():
    storage = TimedStorage()
    expiration = get_dht_time() + 10
    for key in ["s", 1, b"b", (1, "x"), None]:
        assert storage.store(key, key, expiration)
    assert len(storage) == 5


def test_many_replacements_keep_heap_small():
    storage = TimedStorage()
    now = get_dht_time()
    for i in range(10000):
        storage.store("key", i, now + 10 + i)
    assert len(storage) == 1 and len(storage.expiration_heap) < 200
