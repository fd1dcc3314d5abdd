"""hivemind: decentralized deep learning in PyTorch."""

from hivemind.dht import DHT

__version__ = "1.2.0.dev0"

__all__ = ["DHT"]
