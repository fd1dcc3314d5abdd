"""The size a decoded dictionary counts toward MAX_DICTIONARY_BYTES once entries are evicted and stored again."""

import pytest

from hivemind.dht.storage import MAX_DICTIONARY_BYTES, DictionaryDHTValue
from hivemind.utils.serializer import MSGPackSerializer
from hivemind.utils.timed_storage import get_dht_time

pytestmark = pytest.mark.timeout(30)


def test_a_decoded_entry_evicted_and_stored_again_counts_once():
    now, value = get_dht_time(), b"x" * 100
    original = DictionaryDHTValue(maxsize=1)
    original.store("a", value, now + 100)
    decoded = MSGPackSerializer.loads(MSGPackSerializer.dumps(original))  # its entry is sized only when needed

    assert decoded.store("b", b"y" * 100, now + 200)  # evicts "a" (maxsize 1)
    assert decoded.store("a", value, now + 300)  # evicts "b": "a" alone again

    assert [subkey for subkey, _ in decoded.items()] == ["a"]
    assert decoded.nbytes == DictionaryDHTValue.entry_nbytes("a", value)
    # so a new value of "a" that fits the dictionary's limit alone is not refused
    large = bytes(MAX_DICTIONARY_BYTES - DictionaryDHTValue.entry_nbytes("a", b"") - 50)
    assert not decoded.limit_exceeded_by("a", large)
