"""Adaptive compressions refuse a codec class (or None) where a codec instance is needed, when they are built: it
used to fail at the first compress() - inside the averager's process, for an averager - with "'CompressionInfo'
object has no attribute 'requires_grad'"."""

import pytest
import torch

from hivemind.compression import (
    CompressionInfo,
    Float16Compression,
    NoCompression,
    PerTensorCompression,
    RoleAdaptiveCompression,
    SizeAdaptiveCompression,
    TensorRole,
)

BUILDERS = [
    pytest.param(lambda: SizeAdaptiveCompression(10, Float16Compression, NoCompression()), "less", id="size-less"),
    pytest.param(lambda: SizeAdaptiveCompression(10, NoCompression(), None), "greater_equal", id="size-ge"),
    pytest.param(lambda: RoleAdaptiveCompression(gradient=Float16Compression), "gradient", id="role"),
    pytest.param(lambda: RoleAdaptiveCompression(default=None), "default", id="role-default"),
    pytest.param(lambda: PerTensorCompression([NoCompression(), Float16Compression]), r"tensor_compressions\[1\]",
                 id="per-tensor-list"),
    pytest.param(lambda: PerTensorCompression({"w": Float16Compression}), r"tensor_compressions\['w'\]",
                 id="per-tensor-dict"),
]  # fmt: skip


@pytest.mark.parametrize("build, name", BUILDERS)
def test_a_codec_class_or_none_is_refused(build, name):
    with pytest.raises(TypeError, match=rf"{name} must be a compression instance such as Float16Compression\(\)"):
        build()


def test_a_threshold_that_is_not_a_number_is_refused():
    with pytest.raises(TypeError, match="threshold must be a number of elements"):
        SizeAdaptiveCompression("10", NoCompression(), Float16Compression())


def test_instances_still_work():
    tensor = torch.randn(100)
    codecs = [
        SizeAdaptiveCompression(10, NoCompression(), Float16Compression()),
        RoleAdaptiveCompression(gradient=Float16Compression()),
        PerTensorCompression([Float16Compression()]),
        PerTensorCompression({0: Float16Compression()}),
    ]
    for codec in codecs:
        info = CompressionInfo.from_tensor(tensor, key=0, role=TensorRole.GRADIENT)
        assert codec.compress(tensor, info).compression == Float16Compression.compression_type
