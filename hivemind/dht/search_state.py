"""The best entry found so far by one key's search, and when that search may stop (pure, no I/O)."""

from typing import Optional, Set, Union

from hivemind.dht.routing import DHTID, BinaryDHTValue
from hivemind.dht.storage import DictionaryDHTValue
from hivemind.utils.timed_storage import DHTExpiration, ValueWithExpiration

StoredValue = Union[BinaryDHTValue, DictionaryDHTValue]


def merge_dictionaries(*dictionaries: DictionaryDHTValue) -> DictionaryDHTValue:
    """A new dictionary holding, for every subkey, its newest entry among the given ones (inputs are not changed)."""
    merged = DictionaryDHTValue()
    for dictionary in dictionaries:
        for subkey, item in dictionary.items():
            merged.store(subkey, item.value, item.expiration_time)
    return merged


class KeySearch:
    """
    Candidates for one key's value, merged like storage merges them: between regular values and whole dictionaries
    the later expiration wins; two dictionaries merge entry by entry (per subkey, the newest entry wins).
    The search is *satisfied* once the best entry expires no earlier than ``sufficient_expiration_time``.
    """

    def __init__(self, key_id: DHTID, sufficient_expiration_time: DHTExpiration):
        self.key_id, self.sufficient_expiration_time = key_id, sufficient_expiration_time
        self.best: Optional[ValueWithExpiration[StoredValue]] = None
        self.sources: Set[DHTID] = set()  # nodes that contributed the current best entry
        self.finished = False

    def add_candidate(self, candidate: Optional[ValueWithExpiration[StoredValue]], source: DHTID) -> bool:
        """Consider an entry found at node ``source``; returns True if it changed the best entry."""
        if candidate is None:
            return False
        if isinstance(candidate.value, DictionaryDHTValue):  # a copy: a stored dictionary may change during the search
            candidate = ValueWithExpiration(merge_dictionaries(candidate.value), candidate.expiration_time)
        if self.best is None:
            self.best, self.sources = candidate, {source}
            return True
        if isinstance(self.best.value, DictionaryDHTValue) and isinstance(candidate.value, DictionaryDHTValue):
            merged = merge_dictionaries(self.best.value, candidate.value)
            if len(merged) == len(self.best.value) and all(
                self.best.value.get(subkey) == item for subkey, item in merged.items()
            ):
                self.sources.add(source)  # nothing new: the source holds a copy of what we have
                return False
            self.best = ValueWithExpiration(merged, merged.latest_expiration_time)
            self.sources.add(source)
            return True
        if candidate.expiration_time > self.best.expiration_time:
            self.best, self.sources = candidate, {source}
            return True
        if candidate.expiration_time == self.best.expiration_time:
            self.sources.add(source)
        return False

    @property
    def satisfied(self) -> bool:
        return self.best is not None and self.best.expiration_time >= self.sufficient_expiration_time
