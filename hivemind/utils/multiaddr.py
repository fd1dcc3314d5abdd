"""Multiaddr (self-describing network addresses), re-exported from the `multiaddr` package (py-multiaddr)."""

from typing import Optional, Union

from multiaddr import Multiaddr, protocols
from multiaddr.exceptions import ProtocolLookupError, StringParseError

__all__ = ["Multiaddr", "protocols", "ProtocolLookupError", "StringParseError", "peer_id_of"]


def peer_id_of(maddr: Union[str, Multiaddr]) -> Optional[str]:
    """The base58 peer id of the peer a multiaddr leads to, or None if it names none.

    That is the last ``/p2p/`` part: in a relay address ``.../p2p/<relay>/p2p-circuit/p2p/<peer>`` the first one is
    the relay's. An address that ends with ``/p2p-circuit`` leads to no particular peer (None).
    """
    peer_id = None
    for protocol, value in Multiaddr(str(maddr)).items():
        if protocol.name == "p2p":
            peer_id = value
        elif protocol.name == "p2p-circuit":
            peer_id = None
    return peer_id
