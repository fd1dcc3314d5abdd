"""Multiaddr (self-describing network addresses), re-exported from the `multiaddr` package (py-multiaddr)."""

import importlib
import sys
import types
from typing import Optional, Union

from multiaddr import Multiaddr, protocols
from multiaddr.exceptions import ProtocolLookupError, StringParseError


class _Hivemind1Multiaddr(Multiaddr):
    """Unpickles a Multiaddr of hivemind 1.1.12 (its own copy of py-multiaddr, which encodes /p2p/ ids in another
    binary form) as the py-multiaddr Multiaddr of the same address, equal to ``Multiaddr(str(address))``."""

    def __setstate__(self, state) -> None:
        slots = state[1] if isinstance(state, tuple) else state
        decoded = Multiaddr.__new__(Multiaddr)
        decoded._bytes, decoded.registry = slots["_bytes"], slots.get("registry", protocols.REGISTRY)
        address = Multiaddr(str(decoded))
        self._bytes, self.registry = address._bytes, address.registry

    def __reduce__(self):
        return Multiaddr, (str(self),)  # pickled again as a plain Multiaddr


# hivemind 1.1.12's Multiaddr objects (get_visible_maddrs(), PeerInfo.addrs) pickle as
# hivemind.utils.multiaddr.multiaddr.Multiaddr, with a registry of hivemind.utils.multiaddr.protocols: those names
# lead here to py-multiaddr's modules, so that such pickles load
for _submodule in ("codecs", "exceptions", "protocols", "transforms"):
    sys.modules.setdefault(f"{__name__}.{_submodule}", importlib.import_module(f"multiaddr.{_submodule}"))
_legacy_multiaddr_module = types.ModuleType(f"{__name__}.multiaddr")
_legacy_multiaddr_module.Multiaddr = _Hivemind1Multiaddr
sys.modules.setdefault(_legacy_multiaddr_module.__name__, _legacy_multiaddr_module)

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
