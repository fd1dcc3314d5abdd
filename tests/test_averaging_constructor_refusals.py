"""DecentralizedAverager refuses arguments it cannot work with in its constructor, with a reason, instead of failing
every round inside its process."""

import pytest
import torch

from hivemind.averaging.averager import AveragerArgumentError, DecentralizedAverager
from hivemind.compression import Float16Compression
from hivemind.dht import DHT


@pytest.fixture(scope="module")
def lone_dht():
    with DHT(start=True) as dht:
        yield dht


NOT_DENSE_CPU = [
    pytest.param(lambda: torch.zeros(3, device="meta"), id="meta"),
    pytest.param(lambda: torch.zeros(3).to_sparse(), id="sparse"),
    pytest.param(
        lambda: torch.zeros(3, device="cuda"),
        id="cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
    ),
]


@pytest.mark.parametrize("make_tensor", NOT_DENSE_CPU)
def test_a_tensor_that_is_not_a_dense_cpu_tensor_is_refused_before_anything_moves(lone_dht, make_tensor):
    cpu_tensor, tensor = torch.ones(4), make_tensor()
    with pytest.raises(AveragerArgumentError, match=r"averaged_tensors\[1\] .*dense CPU tensors.*\.cpu\(\)"):
        DecentralizedAverager([cpu_tensor, tensor], lone_dht, prefix="devices", start=False)
    assert not cpu_tensor.is_shared()  # refused before the other tensors were moved to shared memory


@pytest.mark.parametrize("option", ["compression", "state_compression"])
def test_a_compression_class_instead_of_an_instance_is_refused(lone_dht, option):
    with pytest.raises(
        AveragerArgumentError, match=f"{option} must be a compression instance.*Float16Compression\\(\\)"
    ):
        DecentralizedAverager([torch.zeros(3)], lone_dht, prefix="codecs", start=False, **{option: Float16Compression})


def test_a_tensor_whose_elements_share_memory_is_refused(lone_dht):
    expanded = torch.zeros(1, 3).expand(4, 3)  # every round would fail when adding its result
    with pytest.raises(AveragerArgumentError, match=r"averaged_tensors\[0\] .*share one memory location.*clone\(\)"):
        DecentralizedAverager([expanded], lone_dht, prefix="expanded", start=False)
