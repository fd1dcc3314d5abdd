"""hivemind 1.1.12's TimedStorage.frozen is a plain attribute: code written for it may set ``storage.frozen = True``
to keep expired entries (and False to let them go), besides ``with storage.freeze():``."""

import time

from hivemind.utils.timed_storage import TimedStorage, get_dht_time


def test_setting_frozen_keeps_expired_entries_until_it_is_cleared():
    storage = TimedStorage()
    storage.store("key", "value", get_dht_time() + 0.05)
    storage.frozen = True
    time.sleep(0.1)  # (the entry has expired: only the flag keeps it)
    assert storage.frozen is True
    assert "key" in storage and storage.get("key").value == "value"
    with storage.freeze():
        pass
    assert storage.frozen is True  # leaving a freeze() does not clear the flag
    storage.frozen = False
    assert storage.frozen is False
    assert "key" not in storage and storage.get("key") is None
