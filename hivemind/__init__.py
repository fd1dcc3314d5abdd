"""hivemind: decentralized deep learning in PyTorch."""

__version__ = "1.2.0.dev0"
