"""Multiaddr (self-describing network addresses), re-exported from the `multiaddr` package (py-multiaddr)."""

from multiaddr import Multiaddr, protocols
from multiaddr.exceptions import ProtocolLookupError, StringParseError

__all__ = ["Multiaddr", "protocols", "ProtocolLookupError", "StringParseError"]
