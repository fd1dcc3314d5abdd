"""How DHTProtocol checks and stores the items of a remote peer's store request (a mixin of DHTProtocol)."""

from typing import Any, List, Optional, Tuple

from hivemind.dht.rate_limit import REENCODING_COST_FACTOR, STORE_BYTES_PER_ITEM
from hivemind.dht.request_checks import (
    IS_DICTIONARY,
    IS_REGULAR_VALUE,
    check_dictionary_entry,
    decode_store_item,
    dictionary_declared_entries,
    dictionary_layout,
    subkey_nbytes,
)
from hivemind.dht.routing import DHTID, Subkey
from hivemind.dht.storage import MAX_DICTIONARY_ENTRIES, DHTLocalStorage, DictionaryDHTValue
from hivemind.dht.validation import DHTRecord
from hivemind.utils.logging import get_logger

logger = get_logger(__name__)


class StoreHandling:
    """
    Each item is checked once and cheaply: its subkey is decoded once (with the bounds it meets inside a dictionary)
    and counted toward its dictionary's size by the length it arrived with, so storing costs no encoding unless the
    subkey could encode longer (see request_checks.subkey_nbytes). Uses the protocol's serializer, storage, cache,
    store_rate_limiter, _reject and _is_valid.
    """

    def _store_item(
        self,
        key: bytes,
        subkey: bytes,
        value: bytes,
        expiration_time: float,
        in_cache: bool,
        now: float,
        sender=None,
        loan_floor: Optional[float] = None,
    ) -> bool:
        decoded_subkey, reason = decode_store_item(key, subkey, value, expiration_time, now)  # the subkey decoded once
        if reason is not None:
            return self._reject(reason)
        key_id, storage = DHTID.from_bytes(key), self.cache if in_cache else self.storage
        if subkey == IS_DICTIONARY:
            return self._store_dictionary(key, key_id, value, storage, now, sender, loan_floor)
        if not self._is_valid(DHTRecord(key, subkey, value, expiration_time)):
            return False
        if subkey == IS_REGULAR_VALUE:
            return storage.store(key_id, value, expiration_time)
        nbytes = subkey_nbytes(subkey, decoded_subkey)  # its length as received, unless it could encode longer
        return self._store_subkey(storage, key_id, decoded_subkey, value, expiration_time, nbytes, sender)

    def _store_subkey(
        self,
        storage: DHTLocalStorage,
        key_id: DHTID,
        subkey: Subkey,
        value: bytes,
        expiration_time: float,
        nbytes: int,
        sender=None,
    ) -> bool:
        """
        Store one entry whose encoded subkey counts ``nbytes`` toward its dictionary's size (see subkey_nbytes), owned
        by ``sender`` (the peer that sent it, or handed over its whole dictionary) for the fair shares of a full
        dictionary (see hivemind.dht.dictionary_shares).
        """
        if storage.store_subkey(key_id, subkey, value, expiration_time, nbytes, owner=sender):
            return True
        if storage.dictionary_full(key_id, subkey, value, nbytes):
            self._reject("dictionary_full")  # MAX_DICTIONARY_ENTRIES / MAX_DICTIONARY_BYTES in hivemind.dht.storage
        return False

    def _decode_dictionary_entries(
        self, value: bytes, source: str, spans: Optional[List[bytes]] = None
    ) -> Optional[Tuple[List[Tuple[Any, bytes, float, Optional[bytes]]], int]]:
        """
        (subkey, value, expiration, the subkey's bytes in ``spans`` or None) of each live entry in a remote peer's
        ext-0x50 bytes, and how many entries the payload held beyond those (expired, NaN expiration, older
        duplicates); None (counted) if malformed. ``spans``: the encoded subkey of each entry of the payload, in order
        (see request_checks.dictionary_layout).
        """
        try:
            dictionary = self.serializer.loads(value)
            if not isinstance(dictionary, DictionaryDHTValue):
                raise TypeError(f"expected a DictionaryDHTValue, got {type(dictionary).__name__}")
            positions, dictionary.decoded_positions = dictionary.decoded_positions, None
            entries = []
            for subkey, item in dictionary.items():
                index = None if spans is None or positions is None else positions.get(subkey)
                span = spans[index] if index is not None and index < len(spans) else None
                entries.append((subkey, item.value, item.expiration_time, span))
            return entries, dictionary.dropped_on_decode
        except Exception as e:
            logger.debug(f"Malformed dictionary in {source}: {e!r}")
            self._reject("malformed_dictionary")
            return None

    def _dictionary_subkey_bytes(self, subkey: Subkey, span: Optional[bytes]) -> Tuple[bytes, int]:
        """A decoded dictionary entry's subkey as received (else encoded again) and the size it counts as."""
        if span is None:
            encoded = self.serializer.dumps(subkey)
            return encoded, len(encoded)
        return span, subkey_nbytes(span, subkey)

    def _store_dictionary(
        self,
        key: bytes,
        key_id: DHTID,
        value: bytes,
        storage,
        now: float,
        sender=None,
        loan_floor: Optional[float] = None,
    ) -> bool:
        """
        Store a whole dictionary entry by entry; True only if it held entries and every one was stored. Charged to the
        sender's store rate limit before each step: one item per entry it declares and one per STORE_BYTES_PER_ITEM
        of its bytes (then its layout is read), what decoding its subkeys and values costs beyond those bytes (then
        it is decoded), and encoding its subkeys again if needed; in a request that borrowed, each may borrow down to
        ``loan_floor`` (see PeerRateLimiter.allow_dictionary).
        """
        limiter, declared = self.store_rate_limiter, dictionary_declared_entries(value)
        # its bytes too, as a request's other bytes: reading the layout weighs them (~3.5 ms per MB of [] in an entry)
        read = len(value) / STORE_BYTES_PER_ITEM
        if not limiter.allow_dictionary(sender, declared + read, loan_floor):
            return self._reject("rate_limited")
        layout = dictionary_layout(value)  # None: not laid out as a dictionary, so it would not decode either
        if layout is None:
            return self._reject("malformed_dictionary")
        spans, decoding_cost = layout
        if not limiter.allow_dictionary(sender, max(0.0, decoding_cost - read), loan_floor):
            return self._reject("rate_limited")
        decoded = self._decode_dictionary_entries(value, "a store request", spans)
        if decoded is None:
            return False
        entries, dropped = decoded
        if len(entries) > MAX_DICTIONARY_ENTRIES:  # never stored whole: refused without checking each entry
            return self._reject("dictionary_full")
        if dropped:
            self.rejected["dropped_dictionary_entry"] += dropped
        # the subkeys as received (for validators and sizes); those not found among them are encoded again
        if any(span is None for *_, span in entries) and not limiter.allow_dictionary(
            sender, REENCODING_COST_FACTOR * decoding_cost, loan_floor
        ):
            return self._reject("rate_limited")
        all_accepted = len(entries) > 0 and dropped == 0
        for subkey, entry_value, entry_expiration, span in entries:
            reason = check_dictionary_entry(entry_value, entry_expiration, now)
            if reason is not None:
                all_accepted = self._reject(reason)
                continue
            encoded_subkey, nbytes = self._dictionary_subkey_bytes(subkey, span)
            if not self._is_valid(DHTRecord(key, encoded_subkey, entry_value, entry_expiration)):
                all_accepted = False
                continue
            all_accepted &= self._store_subkey(storage, key_id, subkey, entry_value, entry_expiration, nbytes, sender)
        return all_accepted
