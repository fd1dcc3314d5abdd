"""hivemind.moe: decentralized mixture-of-experts (remote experts found through the DHT, and their servers).

The names below are imported on first use: the DHT process imports this package (to run the beam search and the
declarations of experts) and stays free of torch.
"""

from hivemind.utils.lazy_exports import lazy_exports

_EXPORTS = {
    "RemoteExpert": "hivemind.moe.client.expert",
    "RemoteMixtureOfExperts": "hivemind.moe.client.moe",
    "RemoteSwitchMixtureOfExperts": "hivemind.moe.client.switch_moe",
    "Server": "hivemind.moe.server.server",
    "ModuleBackend": "hivemind.moe.server.module_backend",
    "background_server": "hivemind.moe.server.server",
    "declare_experts": "hivemind.moe.server.dht_handler",
    "get_experts": "hivemind.moe.server.dht_handler",
    "register_expert_class": "hivemind.moe.server.layers.custom_experts",
}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
del lazy_exports
