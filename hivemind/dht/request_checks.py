"""
Sanity rules for DHT requests and responses from remote peers (sans-IO: plain values in, a reason out).

Every rule returns or raises a short *reason* string, used both in the error a peer gets back and as the name of the
counter that :class:`~hivemind.dht.protocol.DHTProtocol` keeps of rejected input.
"""

import math
from typing import Any, List, Optional, Sequence, Tuple

import msgpack

from hivemind.dht.rate_limit import store_item_cost
from hivemind.dht.storage import MAX_DICTIONARY_BYTES, MAX_ENCODED_DICTIONARY_BYTES
from hivemind.utils import serializer as _serializer_module
from hivemind.utils.serializer import MSGPackSerializer

DHTID_NBYTES = 20
MAX_KEYS_PER_FIND = 4096  # a node batches at most chunk_size (16) keys per find; leave ample room for custom settings
MAX_ITEMS_PER_STORE = 65536  # replication to a new peer sends all its keys at once; 4 MiB / ~30 bytes per item
# a longer subkey could never fit in a key's dictionary (see hivemind.dht.storage); shorter ones are stored as by
# 1.1.12, which has no subkey limit (a lower one here made a remote replica refuse what the storing peer kept)
MAX_SUBKEY_BYTES = MAX_DICTIONARY_BYTES
MAX_NEAREST_NODES = 1024  # neighbours per key in a find response (bucket_size is 20)
# libp2p peer ids are multihashes of at most ~44 bytes (34 for sha2-256, up to 44 for an inlined key); a longer one is
# garbage that would cost seconds to hours of the event loop the first time it is printed (base58 is quadratic)
MAX_PEER_ID_BYTES = 128
MAX_EXPIRATION_HORIZON = 365 * 24 * 3600.0  # a record may not claim to live longer than this from now, in seconds
# values a find response carries in all (a key's dictionary is at most 1 MiB, see hivemind.dht.storage); the rest of
# the 4 MiB message limit is left for neighbour lists and framing
MAX_FIND_RESPONSE_VALUE_BYTES = 3 * 1024 * 1024

IS_REGULAR_VALUE = b"\xc0"  # msgpack(None): the subkey of a regular (non-dictionary) value
IS_DICTIONARY = b""  # the subkey of a whole DictionaryDHTValue (replication and caching only)
_MALFORMED = object()
# every byte but float32's marker: a subkey without it and without registered ext codes never encodes back longer
_CANONICAL_BYTES = bytes(byte for byte in range(256) if byte != 0xCA)


class RequestRejected(ValueError):
    """A remote request or response breaks a rule; ``reason`` names the rule."""

    def __init__(self, reason: str, details: str = ""):
        super().__init__(f"{reason}: {details}" if details else reason)
        self.reason = reason


def check_node_id_bytes(node_id: bytes, *, allow_empty: bool = True) -> None:
    """A NodeInfo.node_id is either empty (a client-mode sender) or a 20-byte DHTID."""
    if len(node_id) == 0 and allow_empty:
        return
    if len(node_id) != DHTID_NBYTES:
        raise RequestRejected("bad_node_id", f"node ids are {DHTID_NBYTES} bytes, got {len(node_id)}")


def check_store_request_shape(
    keys: Sequence[bytes],
    subkeys: Sequence[bytes],
    values: Sequence[bytes],
    expirations: Sequence[float],
    in_cache: Sequence[bool],
) -> None:
    """All repeated fields of a StoreRequest are aligned by index (in_cache may be empty = all False)."""
    if len(keys) > MAX_ITEMS_PER_STORE:
        raise RequestRejected("too_many_items", f"{len(keys)} items in one store request, max {MAX_ITEMS_PER_STORE}")
    if not (len(keys) == len(subkeys) == len(values) == len(expirations)) or len(in_cache) not in (0, len(keys)):
        raise RequestRejected(
            "misaligned_fields",
            f"keys/subkeys/values/expiration_time/in_cache have lengths "
            f"{len(keys)}/{len(subkeys)}/{len(values)}/{len(expirations)}/{len(in_cache)}",
        )


def check_find_request_shape(keys: Sequence[bytes]) -> None:
    if len(keys) > MAX_KEYS_PER_FIND:
        raise RequestRejected("too_many_keys", f"{len(keys)} keys in one find request, max {MAX_KEYS_PER_FIND}")
    for key in keys:
        if len(key) != DHTID_NBYTES:
            raise RequestRejected("bad_key_length", f"keys are {DHTID_NBYTES}-byte ids, got {len(key)} bytes")


def check_expiration_time(expiration_time: float, now: float) -> Optional[str]:
    """Returns a reason if the expiration time is not a finite time within MAX_EXPIRATION_HORIZON from now."""
    if not isinstance(expiration_time, (float, int)) or isinstance(expiration_time, bool):
        return "bad_expiration_type"
    if not math.isfinite(expiration_time):
        return "non_finite_expiration"
    if expiration_time > now + MAX_EXPIRATION_HORIZON:
        return "absurd_expiration"
    return None


def _msgpack_prefix_length(data: bytes) -> Optional[int]:
    """The length of the complete msgpack object that data starts with, or None if it does not start with one."""
    unpacker = msgpack.Unpacker(max_buffer_size=max(len(data), 1))
    try:
        unpacker.feed(data)
        unpacker.skip()
    except Exception:
        return None
    return unpacker.tell()


def check_value_bytes(value: bytes) -> Optional[str]:
    """
    Returns "malformed_value" unless the value *starts* with a msgpack object that decodes within the serializer's
    bounds (nesting depth, see MSGPackSerializer.loads); validators append suffixes such as ``[signature:...]``
    after it. Checked where values enter this node, so a value that would fail every reader is never kept or passed on.
    """
    length = _msgpack_prefix_length(value)
    if length is None:
        return "malformed_value"
    try:
        MSGPackSerializer.loads(value[:length])
    except ValueError:
        return "malformed_value"
    return None


class _InsideDictionary(MSGPackSerializer):
    """Decodes a subkey with the bounds it meets inside its key's dictionary value, see :func:`decode_subkey`."""

    MAX_NESTING_DEPTH = MSGPackSerializer.MAX_NESTING_DEPTH - 3  # [maxsize, latest, [[subkey, value, expiration]]]
    MAX_ITEMS = MSGPackSerializer.MAX_ITEMS - 10  # what those three arrays count (the subkey itself included)


def decode_subkey(subkey: bytes) -> Tuple[Any, Optional[str]]:
    """
    (the decoded subkey, None), or (None, the reason to reject it): not one msgpack object within bounds, not
    hashable, or too deep to decode once inside a dictionary value, where it sits three arrays and one ext type
    deeper (a subkey nested 61 arrays, maps or tuples deep fits; one nested 62 deep would make the key's whole
    dictionary undecodable for every reader). Decoded once, with those tighter bounds.
    """
    state = _serializer_module._state  # registered ext types inside the subkey count one level more, as in 0x50
    state.ext_nesting += 1
    try:
        decoded = _InsideDictionary.loads(subkey)
    except ValueError:
        decoded = _MALFORMED
    finally:
        state.ext_nesting -= 1
    if decoded is _MALFORMED:
        return None, "malformed_subkey"
    try:
        hash(decoded)
    except TypeError:
        return None, "unhashable_subkey"
    return decoded, None


def check_subkey_bytes(subkey: bytes) -> Optional[str]:
    """The reason to reject an encoded subkey (see :func:`decode_subkey`), or None."""
    return decode_subkey(subkey)[1]


def subkey_nbytes(subkey: bytes, decoded: Any) -> int:
    """
    At least the length of ``MSGPackSerializer.dumps(decoded)`` for a subkey decoded from ``subkey``: the received
    length, unless the subkey may hold what encodes longer than it arrived (float32, which encodes back as float64,
    or registered ext types other than tuples, which encode their own way); those are encoded again.
    """
    codes = bytes(code for code in MSGPackSerializer._ext_type_codes)  # noqa: SLF001 (registered at any time)
    if subkey.translate(None, _CANONICAL_BYTES) == b"" and not any(code in subkey for code in codes):
        return len(subkey)
    return len(MSGPackSerializer.dumps(decoded))


def check_store_item(key: bytes, subkey: bytes, value: bytes, expiration_time: float, now: float) -> Optional[str]:
    """
    Returns the reason to reject one StoreRequest item, or None if it is well-formed: the subkey and the value must
    decode (see :func:`decode_subkey`, :func:`check_value_bytes`). A whole dictionary (empty subkey) is decoded
    and checked by the caller with :func:`check_dictionary_entry`; one longer than any dictionary within the per-key
    limits is refused at once (4 MiB of tiny entries took seconds of the event loop to refuse one by one).
    """
    return decode_store_item(key, subkey, value, expiration_time, now)[1]


def decode_store_item(
    key: bytes, subkey: bytes, value: bytes, expiration_time: float, now: float
) -> Tuple[Any, Optional[str]]:
    """:func:`check_store_item`, also returning the decoded subkey of a dictionary entry (else None), decoded once."""
    if len(key) != DHTID_NBYTES:
        return None, "bad_key_length"
    reason = check_expiration_time(expiration_time, now)
    if reason is not None:
        return None, reason
    if len(subkey) > MAX_SUBKEY_BYTES:
        return None, "oversize_subkey"
    if subkey == IS_DICTIONARY:  # checked entry by entry once decoded, unless it could never be stored whole
        return None, "dictionary_full" if len(value) > MAX_ENCODED_DICTIONARY_BYTES else None
    decoded = None
    if subkey != IS_REGULAR_VALUE:
        decoded, reason = decode_subkey(subkey)
        if reason is not None:
            return None, reason
    reason = check_value_bytes(value)
    return (None, reason) if reason is not None else (decoded, None)


_BIN_HEADS = (0xC4, 0xC5, 0xC6)  # bin 8/16/32: a bytes entry value
_EXT_HEADERS = {0xC7: 1, 0xC8: 2, 0xC9: 4, 0xD4: 0, 0xD5: 0, 0xD6: 0, 0xD7: 0, 0xD8: 0}  # -> bytes of the length


def _dictionary_entries_unpacker(value: bytes) -> Optional[Tuple[msgpack.Unpacker, memoryview, int]]:
    """An unpacker positioned at the first entry of a whole dictionary (ext 0x50 bytes), its payload, the number of
    entries that the payload declares; None if the bytes do not start like a dictionary."""
    length_bytes = _EXT_HEADERS.get(value[0]) if value else None
    if length_bytes is None:
        return None
    payload = memoryview(value)[2 + length_bytes :]
    unpacker = msgpack.Unpacker(max_buffer_size=max(len(payload), 1))
    try:
        unpacker.feed(payload)
        if unpacker.read_array_header() != 3:
            return None
        unpacker.skip()  # maxsize
        unpacker.skip()  # latest expiration time
        return unpacker, payload, unpacker.read_array_header()
    except Exception:
        return None


def dictionary_declared_entries(value: bytes) -> int:
    """How many entries a whole dictionary's payload declares (read from its header only; 0 if malformed)."""
    start = _dictionary_entries_unpacker(value)
    return 0 if start is None else start[2]


def dictionary_layout(value: bytes) -> Optional[Tuple[List[bytes], float]]:
    """
    The encoded subkey of each entry of a whole dictionary (ext 0x50 bytes), in the order of the payload, and what
    its entries cost beyond one item each: decoding their subkeys and values, weighed as a store item's
    (rate_limit.store_item_cost), found at C speed without decoding them; None if the bytes are not laid out as a
    dictionary. An entry value that is not bytes is weighed as its encoded bytes are: it was unpacked here and charged
    nothing (an array of 300 000 ``[[]]``, 600 KB: ~0.34 s here, 0.43 s with decoding it, for ~2 items).
    """
    start = _dictionary_entries_unpacker(value)
    if start is None:
        return None
    unpacker, payload, num_entries = start
    spans, cost = [], 0.0
    try:
        for _ in range(num_entries):
            if unpacker.read_array_header() != 3:
                return None
            position = unpacker.tell()
            unpacker.skip()
            subkey, position = bytes(payload[position : unpacker.tell()]), unpacker.tell()
            if payload[position] in _BIN_HEADS:
                entry_value = unpacker.unpack()
            else:  # not bytes: refused once decoded (check_dictionary_entry), charged as what decoding it takes
                unpacker.skip()
                entry_value = bytes(payload[position : unpacker.tell()])
            unpacker.skip()  # expiration time
            spans.append(subkey)
            cost += store_item_cost(subkey, entry_value) - 1.0
    except Exception:
        return None
    return spans, cost


def check_dictionary_entry(value: object, expiration_time: object, now: float) -> Optional[str]:
    """One (subkey -> value, expiration) entry of a DictionaryDHTValue received from a remote peer."""
    if not isinstance(value, bytes):
        return "malformed_dictionary"
    reason = check_expiration_time(expiration_time, now)  # type: ignore[arg-type]
    if reason is not None:
        return reason
    return check_value_bytes(value)


def check_find_result_shape(
    result_type: int,
    expiration_time: float,
    nearest_node_ids: Sequence[bytes],
    nearest_peer_ids: Sequence[bytes],
    now: float,
) -> None:
    """A FindResult from a remote peer: a known type, aligned neighbour lists of sane size, a finite expiration."""
    if result_type not in (0, 1, 2):
        raise RequestRejected("bad_result_type", f"unknown FindResult type {result_type}")
    if len(nearest_node_ids) != len(nearest_peer_ids) or len(nearest_node_ids) > MAX_NEAREST_NODES:
        raise RequestRejected(
            "misaligned_fields", f"{len(nearest_node_ids)} node ids vs {len(nearest_peer_ids)} peer ids"
        )
    if any(len(node_id) != DHTID_NBYTES for node_id in nearest_node_ids):
        raise RequestRejected("bad_node_id", f"neighbour node ids must be {DHTID_NBYTES} bytes")
    if any(not 0 < len(peer_id) <= MAX_PEER_ID_BYTES for peer_id in nearest_peer_ids):
        raise RequestRejected("bad_peer_id", f"neighbour peer ids must be 1 to {MAX_PEER_ID_BYTES} bytes")
    if result_type != 0:
        reason = check_expiration_time(expiration_time, now)
        if reason is not None:
            raise RequestRejected(reason, f"expiration_time={expiration_time}")
