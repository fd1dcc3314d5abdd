"""The client side of mixture-of-experts: remote experts, mixture layers and the beam search that finds experts.

The names below are imported on first use (the DHT process imports this package to run the beam search, without
torch); the beam search that runs there is hivemind.moe.client.beam_search_dht.
"""

from hivemind.utils.lazy_exports import lazy_exports

_EXPORTS = {
    "MoEBeamSearcher": "hivemind.moe.client.beam_search",
    "RemoteExpert": "hivemind.moe.client.expert",
    "RemoteExpertWorker": "hivemind.moe.client.remote_expert_worker",
    "RemoteMixtureOfExperts": "hivemind.moe.client.moe",
    "RemoteSwitchMixtureOfExperts": "hivemind.moe.client.switch_moe",
    "create_remote_experts": "hivemind.moe.client.expert",
    "batch_create_remote_experts": "hivemind.moe.client.expert",
}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
del lazy_exports
