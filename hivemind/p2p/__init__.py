"""hivemind.p2p: libp2p peers backed by the p2pd daemon, protobuf RPC handlers and servicers."""

from hivemind.p2p.p2p_daemon import P2P, P2PContext, P2PDaemonError, P2PHandlerError, P2PTimeoutError
from hivemind.p2p.p2p_daemon_bindings import PeerID, PeerInfo
from hivemind.p2p.servicer import ServicerBase, StubBase

__all__ = [
    "P2P",
    "P2PContext",
    "P2PDaemonError",
    "P2PHandlerError",
    "P2PTimeoutError",
    "PeerID",
    "PeerInfo",
    "ServicerBase",
    "StubBase",
]
