"""The server side of mixture-of-experts: hosting experts, batching their requests and announcing them in the DHT.

The names below are imported on first use (the DHT process imports this package to store declarations of experts,
without torch).
"""

from hivemind.utils.lazy_exports import lazy_exports

_EXPORTS = {
    "ConnectionHandler": "hivemind.moe.server.connection_handler",
    "ModuleBackend": "hivemind.moe.server.module_backend",
    "Runtime": "hivemind.moe.server.runtime",
    "Server": "hivemind.moe.server.server",
    "background_server": "hivemind.moe.server.server",
    "declare_experts": "hivemind.moe.server.dht_handler",
    "get_experts": "hivemind.moe.server.dht_handler",
    "register_expert_class": "hivemind.moe.server.layers",
}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
del lazy_exports
