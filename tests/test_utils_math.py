"""Linear-algebra helpers of PowerSGD: in-place orthogonalization and greedy flattening of shapes."""

import pytest
import torch

from hivemind.utils.math import get_flatten_greedy_dims, orthogonalize_


def test_orthogonalize_gives_orthonormal_columns_in_place():
    torch.manual_seed(0)
    matrix = torch.randn(50, 4)
    result = orthogonalize_(matrix)
    assert result is matrix
    assert torch.allclose(matrix.T @ matrix, torch.eye(4), atol=1e-5)


def test_orthogonalize_keeps_the_span_of_the_first_column():
    torch.manual_seed(0)
    matrix = torch.randn(10, 3)
    first = matrix[:, 0].clone()
    orthogonalize_(matrix)
    assert torch.allclose(matrix[:, 0], first / first.norm(), atol=1e-6)


def test_orthogonalize_of_dependent_columns_does_not_produce_nan():
    matrix = torch.ones(5, 2)
    orthogonalize_(matrix)
    assert torch.isfinite(matrix).all()


def test_orthogonalize_refuses_non_matrices():
    with pytest.raises(ValueError, match="2-D"):
        orthogonalize_(torch.ones(3))


@pytest.mark.parametrize(
    "shape, max_ndim, expected",
    [
        ((64, 32, 3, 3), 2, (64, 288)),
        ((10, 20), 2, (10, 20)),
        ((7,), 2, (7,)),
        ((2, 3, 4), 1, (24,)),
        ((100, 2, 2, 50), 2, (100, 200)),
    ],
)
def test_flatten_greedy_dims(shape, max_ndim, expected):
    assert get_flatten_greedy_dims(torch.empty(shape), max_ndim) == expected


@pytest.mark.parametrize("scale", [1e-12, 1e-3, 1.0, 1e4])
def test_orthogonalize_of_a_rank_deficient_matrix_gives_a_projection_onto_its_span(scale):
    """Columns that depend on the previous ones (up to rounding) become zero, not unit vectors of rounding noise:
    else P P^T is no projection, and PowerSGD's P (P^T M) overshoots a gradient of lower rank than its own."""
    torch.manual_seed(0)
    matrix = torch.outer(torch.randn(64), torch.randn(32)) * scale
    p = orthogonalize_(matrix @ torch.randn(32, 4))
    assert torch.allclose(p @ (p.t() @ matrix), matrix, atol=1e-5 * scale)
    assert torch.allclose(p[:, 1:], torch.zeros(64, 3))
