"""Reference values for the compression tests, computed by torch alone."""

import torch


def c_order_bytes(tensor: torch.Tensor) -> bytes:
    """Little-endian C-order bytes of ``tensor``'s values (conjugate and negative views resolved), without numpy."""
    resolved = tensor.detach().resolve_conj().resolve_neg().contiguous()
    return bytes(resolved.flatten().view(torch.uint8).tolist())
