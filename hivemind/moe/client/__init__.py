"""The client side of mixture-of-experts: remote experts, mixture layers and the beam search that finds experts."""

from hivemind.moe.client.beam_search import MoEBeamSearcher
from hivemind.moe.client.expert import RemoteExpert, batch_create_remote_experts, create_remote_experts
from hivemind.moe.client.moe import RemoteMixtureOfExperts
from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker
from hivemind.moe.client.switch_moe import RemoteSwitchMixtureOfExperts

__all__ = [
    "MoEBeamSearcher",
    "RemoteExpert",
    "RemoteExpertWorker",
    "RemoteMixtureOfExperts",
    "RemoteSwitchMixtureOfExperts",
    "create_remote_experts",
    "batch_create_remote_experts",
]
