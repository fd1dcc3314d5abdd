"""Small linear-algebra helpers used by low-rank gradient compression (PowerSGD)."""

from __future__ import annotations

from typing import Tuple

import torch

__all__ = ["orthogonalize_", "get_flatten_greedy_dims"]


@torch.no_grad()
def orthogonalize_(matrix: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """
    Make the columns of a 2-D ``matrix`` orthonormal in place (modified Gram-Schmidt) and return it.

    A column that is (numerically) a combination of the previous ones becomes zero, neither NaN nor a unit vector
    of rounding noise (which would make ``matrix @ matrix.T`` no projection): that is, a column whose norm after
    removing the previous directions is at most sqrt(machine epsilon) of its norm before (or at most ``eps``; the
    tolerance is relative, so that columns of any scale, e.g. tiny gradients, are normalized exactly).
    """
    if matrix.ndim != 2:
        raise ValueError(f"orthogonalize_ expects a 2-D matrix, got shape {tuple(matrix.shape)}")
    num_columns = matrix.shape[1]
    relative_tolerance = torch.finfo(matrix.dtype).eps ** 0.5 if matrix.is_floating_point() else 0.0
    floors = (matrix.norm(dim=0) * relative_tolerance).clamp_min(eps)
    for i in range(num_columns):
        column = matrix[:, i]
        norm = column.norm()
        if norm <= floors[i]:
            column.zero_()
        else:
            column.div_(norm)
        if i + 1 < num_columns:
            rest = matrix[:, i + 1 :]
            rest.sub_(torch.outer(column, column @ rest))
    return matrix


def get_flatten_greedy_dims(tensor: torch.Tensor, max_ndim: int = 2) -> Tuple[int, ...]:
    """
    The shape to view ``tensor`` with at most ``max_ndim`` dimensions, merging neighbouring dimensions greedily: the
    adjacent pair with the smallest product is merged first, so the result stays as balanced as the order allows
    (e.g. a conv weight [64, 32, 3, 3] becomes [64, 288]). Tensors with at most ``max_ndim`` dims keep their shape.
    """
    if max_ndim < 1:
        raise ValueError(f"max_ndim must be at least 1, got {max_ndim}")
    dims = list(tensor.shape)
    while len(dims) > max_ndim:
        products = [dims[i] * dims[i + 1] for i in range(len(dims) - 1)]
        best = min(range(len(products)), key=products.__getitem__)
        dims[best : best + 2] = [products[best]]
    return tuple(dims)
