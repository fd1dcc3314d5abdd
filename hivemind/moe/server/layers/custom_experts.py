"""The expert registry: expert classes by name, with a function that makes a sample input for each."""

from __future__ import annotations

from typing import Callable, Dict, Tuple, Type, Union

import torch
from torch import nn

__all__ = ["name_to_block", "name_to_input", "register_expert_class"]

SampleInput = Callable[[int, int], Union[torch.Tensor, Tuple[torch.Tensor, ...]]]

name_to_block: Dict[str, Type[nn.Module]] = {}  # name -> expert class, constructed as cls(hidden_dim)
name_to_input: Dict[str, SampleInput] = {}  # name -> sample_input(batch_size, hidden_dim)


def register_expert_class(name: str, sample_input: SampleInput):
    """Class decorator: make an expert class available under ``name`` (e.g. for ``hivemind-server --expert_cls``).

    :param name: registry name; registering a name twice raises RuntimeError
    :param sample_input: ``sample_input(batch_size, hidden_dim)`` returns a tensor or a tuple of tensors shaped like
      the expert's positional inputs (used to derive the input schema)
    """
    if not callable(sample_input):
        raise TypeError(f"sample_input for expert class {name!r} must be callable(batch_size, hidden_dim)")

    def _register(cls: Type[nn.Module]) -> Type[nn.Module]:
        if name in name_to_block:
            raise RuntimeError(
                f"an expert class named {name!r} is already registered ({name_to_block[name].__qualname__}); "
                f"choose another name"
            )
        name_to_block[name] = cls
        name_to_input[name] = sample_input
        return cls

    return _register
