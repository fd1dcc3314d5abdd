"""hivemind: decentralized deep learning in PyTorch.

The top level exports the main user-facing objects. For scripts written against hivemind <= 1.1.11, which also
reached utilities, compression codecs and p2p classes through the top level (``hivemind.get_dht_time()``,
``hivemind.P2P``, ``hivemind.Float16Compression``, ...), those names still resolve, lazily, on first access.
"""

from hivemind.dht import DHT
from hivemind.utils.lazy_exports import import_lazily as _import_lazily

__version__ = "1.2.0.dev0"

# main objects that need torch: imported on first access, so that ``import hivemind`` stays light
_LAZY_EXPORTS = {
    "DecentralizedAverager": "hivemind.averaging.averager",
    "Optimizer": "hivemind.optim.optimizer",
    "GradScaler": "hivemind.optim.grad_scaler",
    "TrainingAverager": "hivemind.optim.training_averager",
    "RemoteExpert": "hivemind.moe.client.expert",
    "RemoteMixtureOfExperts": "hivemind.moe.client.moe",
    "RemoteSwitchMixtureOfExperts": "hivemind.moe.client.switch_moe",
    "Server": "hivemind.moe.server.server",
    "ModuleBackend": "hivemind.moe.server.module_backend",
    "register_expert_class": "hivemind.moe.server.layers.custom_experts",
}
# subpackages reachable as attributes after a bare ``import hivemind`` (hivemind.averaging, hivemind.optim, ...)
_LAZY_SUBPACKAGES = ("averaging", "moe", "optim")

__all__ = ["DHT", *_LAZY_EXPORTS]

# backward-compatible aliases: subpackage providing each name (imported only when the name is used)
_ALIAS_SOURCES = ("hivemind.utils", "hivemind.p2p", "hivemind.compression")


def __getattr__(name: str):
    if name in _LAZY_EXPORTS:
        value = getattr(_import_lazily(_LAZY_EXPORTS[name]), name)
        globals()[name] = value
        return value
    if name in _LAZY_SUBPACKAGES:
        return _import_lazily(f"{__name__}.{name}")
    if not name.startswith("_"):
        for module_name in _ALIAS_SOURCES:
            module = _import_lazily(module_name)
            if name in getattr(module, "__all__", ()):
                value = getattr(module, name)
                globals()[name] = value
                return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
