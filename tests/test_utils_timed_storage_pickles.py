"""TimedStorage and DictionaryDHTValue pickles: round trips, and the layout our earlier versions wrote."""

import itertools
import pickle

from hivemind.dht.storage import DictionaryDHTValue
from hivemind.utils.timed_storage import HeapEntry, TimedStorage, ValueWithExpiration

FAR = 1e10


def test_round_trip_keeps_entries_order_and_the_frozen_flag():
    storage = TimedStorage(maxsize=3)
    storage.store("late", 1, FAR + 2)
    storage.store("early", 2, FAR + 1)
    storage.store("middle", 3, FAR + 1.5)
    storage.frozen = True
    state = storage.__getstate__()
    assert state["expiration_heap"][0] == HeapEntry(FAR + 1, "early")  # a heap as 1.1.12 keeps it
    restored = pickle.loads(pickle.dumps(storage))
    assert restored.frozen and restored.maxsize == 3
    assert [key for key, _ in restored.items()] == ["late", "early", "middle"]
    restored.frozen = False
    assert restored.top() == ("early", ValueWithExpiration(2, FAR + 1))
    assert restored.store("new", 4, FAR + 3)  # over capacity: the entry that expires first goes
    assert [key for key, _ in restored.items()] == ["late", "middle", "new"]


def test_the_layout_of_our_earlier_pickles_still_loads():
    value = DictionaryDHTValue.__new__(DictionaryDHTValue)
    entry = (FAR, 0, "a")
    earlier_state = {
        "maxsize": float("inf"),
        "data": {"a": ValueWithExpiration(b"1", FAR)},
        "expiration_heap": [entry],
        "key_to_heap": {"a": entry},
        "_counter": itertools.count(1),
        "_frozen_depth": 0,
        "_frozen_by_flag": True,
        "_entry_nbytes": {"a": 19},
        "_total_nbytes": 19,
        "latest_expiration_time": FAR,
    }
    value.__setstate__(earlier_state)
    assert value.get("a") == (b"1", FAR) and value.frozen and value.latest_expiration_time == FAR
    assert value.nbytes == value.entry_nbytes("a", b"1")
    assert value.store("b", b"2", FAR + 1) and len(value) == 2
