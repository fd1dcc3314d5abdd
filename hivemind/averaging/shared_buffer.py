"""Moving many tensors to shared memory at the cost of one file descriptor.

``tensor.share_memory_()`` gives every tensor its own shared-memory file, and with torch's default sharing strategy
(file_descriptor) each one keeps a descriptor open in every process that maps it: a model of 1500 parameter tensors
would cost 1500 descriptors in the user's process and as many in the averager's. :func:`share_in_one_buffer` instead
copies the tensors into one shared buffer and points each tensor object at its slice of it, in place (as
``share_memory_`` does, the caller's tensor objects become the shared ones). Views of one storage also cross to a
spawned process as that storage once: pickling the tensors sends a single descriptor.
"""

from typing import List, Sequence

import torch

from hivemind.averaging.output_buffers import storage_used_once
from hivemind.averaging.state_snapshot import pack_tensors

__all__ = ["share_in_one_buffer"]


def _movable(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` can be re-pointed at a slice of a new buffer without anything else noticing: a dense CPU
    tensor that is the only user of its whole storage."""
    if tensor.device.type != "cpu" or tensor.layout != torch.strided or not tensor.is_contiguous():
        return False
    if tensor.storage_offset() != 0 or tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
        return False
    # other tensors on the storage (views, detached aliases) would lose their aliasing if only this one moved; a
    # torch that cannot tell: each tensor is shared on its own
    return storage_used_once(tensor)


def share_in_one_buffer(tensors: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """Put ``tensors`` in shared memory, in place: the movable ones (see ``_movable``) as slices of one new shared
    buffer, the others with ``share_memory_()`` (e.g. views of a larger tensor, whose whole storage moves so that the
    other views keep seeing it; CUDA tensors are left where they are). Returns the same tensor objects."""
    tensors = list(tensors)
    seen, movable = set(), []
    for index, tensor in enumerate(tensors):
        if id(tensor) not in seen and _movable(tensor):
            movable.append(index)
        seen.add(id(tensor))
    with torch.no_grad():
        if movable:
            packed = pack_tensors([tensors[index] for index in movable], reuse=False)
            storage = packed.buffer.untyped_storage()
            for index, layout in zip(movable, packed.layouts):
                tensor = tensors[index]
                tensor.set_(storage, layout.offset // tensor.element_size(), tensor.shape, tensor.stride())
        for tensor in tensors:
            if not tensor.is_shared():
                tensor.share_memory_()
    return tensors
