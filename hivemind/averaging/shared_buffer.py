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

from hivemind.averaging.state_snapshot import pack_tensors

__all__ = ["share_in_one_buffer"]

# a storage referenced by one tensor reports this use count when asked through a fresh storage object; more means
# that other tensors (views, detached aliases) share it, and re-pointing only one of them would break their aliasing
_EXCLUSIVE_USE_COUNT = 2


def _movable(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` can be re-pointed at a slice of a new buffer without anything else noticing: a dense CPU
    tensor that is the only user of its whole storage."""
    if tensor.device.type != "cpu" or tensor.layout != torch.strided or not tensor.is_contiguous():
        return False
    storage = tensor.untyped_storage()
    if tensor.storage_offset() != 0 or storage.nbytes() != tensor.numel() * tensor.element_size():
        return False
    use_count = getattr(torch._C, "_storage_Use_Count", None)  # (a torch without it: share each on its own)
    return use_count is not None and use_count(storage._cdata) <= _EXCLUSIVE_USE_COUNT


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
