"""Expert uids and prefixes: ``ffn.3.14`` names the expert at coordinates (3, 14) of the ``ffn`` grid."""

from __future__ import annotations

import re
from typing import NamedTuple, Optional, Tuple

from hivemind.p2p import PeerID

__all__ = [
    "ExpertUID",
    "ExpertPrefix",
    "Coordinate",
    "Score",
    "ExpertInfo",
    "UID_DELIMITER",
    "FLAT_EXPERT",
    "UID_PATTERN",
    "PREFIX_PATTERN",
    "is_valid_uid",
    "is_valid_prefix",
    "split_uid",
    "parse_peer_id",
    "MAX_PEER_ID_CHARS",
]

ExpertUID = str  # e.g. "ffn.3.14"
ExpertPrefix = str  # e.g. "ffn.3."
Coordinate = int  # an index along one grid dimension
Score = float  # a gating score

MAX_PEER_ID_CHARS = 64  # base58 of the longest libp2p peer id (an identity multihash of a 42-byte key) fits in 61

_SHA2_256, _IDENTITY = 0x12, 0x00  # the two multihashes that libp2p peer ids use
_MAX_INLINE_KEY_BYTES = 42  # libp2p inlines (identity multihash) serialized public keys of at most this many bytes

UID_DELIMITER = "."  # separates the expert type and each coordinate
FLAT_EXPERT = -1  # pseudo-coordinate under which a 1-D grid's expert `ffn.5` is stored at its own prefix `ffn.5.`

_TYPE = r"[^.]+"  # the expert type: anything without a dot
_INDEX = r"(?:0|[1-9][0-9]*)"  # a coordinate: decimal integer without leading zeros
UID_PATTERN = re.compile(rf"{_TYPE}(?:\.{_INDEX})+")
PREFIX_PATTERN = re.compile(rf"{_TYPE}(?:\.{_INDEX})*\.")


class ExpertInfo(NamedTuple):
    """Where an expert lives: its uid and the peer id of the server that hosts it."""

    uid: ExpertUID
    peer_id: PeerID


def is_valid_uid(maybe_uid: str) -> bool:
    """True for a complete uid such as ``ffn.3.14`` (a type followed by one or more integer coordinates)."""
    return isinstance(maybe_uid, str) and UID_PATTERN.fullmatch(maybe_uid) is not None


def is_valid_prefix(maybe_prefix: str) -> bool:
    """True for a uid prefix that ends with the delimiter, such as ``ffn.`` or ``ffn.3.``."""
    return isinstance(maybe_prefix, str) and PREFIX_PATTERN.fullmatch(maybe_prefix) is not None


def split_uid(uid_or_prefix: str) -> Tuple[ExpertPrefix, Coordinate]:
    """Separate the last coordinate: ``ffn.3.14`` -> (``ffn.3.``, 14); a prefix ``ffn.3.`` -> (``ffn.``, 3).

    :raises ValueError: if there is no integer coordinate to split off
    """
    stripped = uid_or_prefix[:-1] if uid_or_prefix.endswith(UID_DELIMITER) else uid_or_prefix
    prefix, delimiter, last = stripped.rpartition(UID_DELIMITER)
    if not delimiter or not prefix or re.fullmatch(_INDEX, last) is None:
        raise ValueError(f"{uid_or_prefix!r} does not end with an integer coordinate (expected e.g. 'ffn.3.14')")
    return prefix + UID_DELIMITER, int(last)


def parse_peer_id(maybe_peer_id: object) -> Optional[PeerID]:
    """The PeerID written as ``maybe_peer_id`` (base58, as servers announce it in the DHT), or None if it is not one.

    A libp2p peer id is a multihash of the peer's public key: sha2-256 (0x12, 32, then 32 bytes) or, for short keys
    such as Ed25519, identity (0x00, the key's length, then the key). Anything else, including valid base58 that
    decodes to other bytes, cannot be a peer to call.
    """
    if not isinstance(maybe_peer_id, str) or not 0 < len(maybe_peer_id) <= MAX_PEER_ID_CHARS:
        return None
    try:
        peer_id = PeerID.from_base58(maybe_peer_id)
    except (ValueError, TypeError):
        return None
    raw = peer_id.to_bytes()
    if len(raw) < 3:
        return None
    code, length, digest_length = raw[0], raw[1], len(raw) - 2
    if code == _SHA2_256 and length == digest_length == 32:
        return peer_id
    if code == _IDENTITY and length == digest_length <= _MAX_INLINE_KEY_BYTES:
        return peer_id
    return None
