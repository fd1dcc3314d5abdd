"""hivemind.moe: decentralized mixture-of-experts (remote experts found through the DHT, and their servers)."""

from hivemind.moe.client import RemoteExpert, RemoteMixtureOfExperts, RemoteSwitchMixtureOfExperts
from hivemind.moe.server.dht_handler import declare_experts, get_experts
from hivemind.moe.server.layers.custom_experts import register_expert_class
from hivemind.moe.server.module_backend import ModuleBackend
from hivemind.moe.server.server import Server, background_server

__all__ = [
    "RemoteExpert",
    "RemoteMixtureOfExperts",
    "RemoteSwitchMixtureOfExperts",
    "Server",
    "ModuleBackend",
    "background_server",
    "declare_experts",
    "get_experts",
    "register_expert_class",
]
