"""hivemind.moe: decentralized mixture-of-experts (remote experts found through the DHT, and their servers)."""

from hivemind.moe.client import RemoteExpert, RemoteMixtureOfExperts, RemoteSwitchMixtureOfExperts
from hivemind.moe.server.dht_handler import declare_experts, get_experts

__all__ = [
    "RemoteExpert",
    "RemoteMixtureOfExperts",
    "RemoteSwitchMixtureOfExperts",
    "declare_experts",
    "get_experts",
]
