"""Expert uids and prefixes: ``ffn.3.14`` names the expert at coordinates (3, 14) of the ``ffn`` grid."""

from __future__ import annotations

import re
from typing import NamedTuple, Tuple

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
]

ExpertUID = str  # e.g. "ffn.3.14"
ExpertPrefix = str  # e.g. "ffn.3."
Coordinate = int  # an index along one grid dimension
Score = float  # a gating score

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
