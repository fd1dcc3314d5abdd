"""The server side of mixture-of-experts: hosting experts, batching their requests and announcing them in the DHT."""

from hivemind.moe.server.connection_handler import ConnectionHandler
from hivemind.moe.server.dht_handler import declare_experts, get_experts
from hivemind.moe.server.layers import register_expert_class
from hivemind.moe.server.module_backend import ModuleBackend
from hivemind.moe.server.runtime import Runtime
from hivemind.moe.server.server import Server, background_server

__all__ = [
    "ConnectionHandler",
    "ModuleBackend",
    "Runtime",
    "Server",
    "background_server",
    "declare_experts",
    "get_experts",
    "register_expert_class",
]
