"""Client bindings of the p2pd control protocol."""

from hivemind.p2p.p2p_daemon_bindings.datastructures import PeerID, PeerInfo, StreamInfo

__all__ = ["PeerID", "PeerInfo", "StreamInfo"]
