"""
Sanity rules for DHT requests and responses from remote peers (sans-IO: plain values in, a reason out).

Every rule returns or raises a short *reason* string, used both in the error a peer gets back and as the name of the
counter that :class:`~hivemind.dht.protocol.DHTProtocol` keeps of rejected input.
"""

import math
from typing import Optional, Sequence

import msgpack

from hivemind.dht.storage import MAX_DICTIONARY_BYTES, MAX_ENCODED_DICTIONARY_BYTES, DictionaryDHTValue
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

DICTIONARY_EXT_CODE = 0x50  # msgpack ext type of DictionaryDHTValue
IS_REGULAR_VALUE = b"\xc0"  # msgpack(None): the subkey of a regular (non-dictionary) value
IS_DICTIONARY = b""  # the subkey of a whole DictionaryDHTValue (replication and caching only)


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


def _dictionary_holding(subkey: bytes) -> bytes:
    """A DictionaryDHTValue (ext 0x50) whose one entry has this encoded subkey, as a find response would carry it."""
    payload = b"\x93\x00\x00\x91\x93" + subkey + b"\xc4\x00\x00"  # [maxsize, latest, [[subkey, b"", expiration]]]
    return msgpack.packb(msgpack.ExtType(DICTIONARY_EXT_CODE, payload))


def check_subkey_bytes(subkey: bytes) -> Optional[str]:
    """
    Returns the reason to reject an encoded subkey: not one msgpack object within bounds, not hashable, or too deep
    to decode once inside a dictionary value, where it sits three arrays and one ext type deeper (a subkey nested
    61 arrays, maps or tuples deep fits; one nested 62 deep would make the key's whole dictionary undecodable for
    every reader).
    """
    try:
        decoded = MSGPackSerializer.loads(subkey)
    except ValueError:
        return "malformed_subkey"
    try:
        hash(decoded)
    except TypeError:
        return "unhashable_subkey"
    try:
        holder = MSGPackSerializer.loads(_dictionary_holding(subkey))
    except ValueError:
        return "malformed_subkey"
    return None if isinstance(holder, DictionaryDHTValue) else "malformed_subkey"


def check_store_item(key: bytes, subkey: bytes, value: bytes, expiration_time: float, now: float) -> Optional[str]:
    """
    Returns the reason to reject one StoreRequest item, or None if it is well-formed: the subkey and the value must
    decode (see :func:`check_subkey_bytes`, :func:`check_value_bytes`). A whole dictionary (empty subkey) is decoded
    and checked by the caller with :func:`check_dictionary_entry`; one longer than any dictionary within the per-key
    limits is refused at once (4 MiB of tiny entries took seconds of the event loop to refuse one by one).
    """
    if len(key) != DHTID_NBYTES:
        return "bad_key_length"
    reason = check_expiration_time(expiration_time, now)
    if reason is not None:
        return reason
    if len(subkey) > MAX_SUBKEY_BYTES:
        return "oversize_subkey"
    if subkey == IS_DICTIONARY:  # checked entry by entry once decoded, unless it could never be stored whole
        return "dictionary_full" if len(value) > MAX_ENCODED_DICTIONARY_BYTES else None
    if subkey != IS_REGULAR_VALUE:
        reason = check_subkey_bytes(subkey)
        if reason is not None:
            return reason
    return check_value_bytes(value)


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
