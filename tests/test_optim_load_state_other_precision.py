"""A donor that keeps its model (and so its optimizer statistics) in another floating-point precision than the
newcomer's: its state is loaded, cast into the newcomer's tensors (as 1.1.12 loads it); other dtypes are refused."""

import time

import pytest
import torch

from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.state_download import StateAssembler, StateDownloadError, _decode_checked
from hivemind.compression import NoCompression, serialize_torch_tensor
from hivemind.dht import DHT
from hivemind.optim.state_averager import TrainingStateAverager
from hivemind.proto import averaging_pb2
from hivemind.utils import MSGPackSerializer
from hivemind.utils.streaming import split_for_streaming


@pytest.fixture
def dht_pair():
    first = DHT(start=True)
    second = DHT(start=True, initial_peers=first.get_visible_maddrs())
    yield first, second
    second.shutdown()
    first.shutdown()


@pytest.mark.timeout(90)
def test_a_donor_in_double_precision_is_loaded_into_a_float_model(dht_pair):
    torch.manual_seed(0)
    donor_model, model = torch.nn.Linear(3, 2).double(), torch.nn.Linear(3, 2)
    adam = lambda params: torch.optim.Adam(params, lr=0.1)  # noqa: E731
    options = dict(prefix="precision", start=True)
    donor = TrainingStateAverager(
        dht=dht_pair[0], optimizer=adam, params=donor_model.parameters(), declare_state_period=1.0, **options
    )
    newcomer = TrainingStateAverager(dht=dht_pair[1], optimizer=adam, params=model.parameters(), **options)
    try:
        for param in donor_model.parameters():
            param.grad = torch.ones_like(param)
        donor.step(optimizer_step=True)
        donor.local_epoch = 2
        deadline = time.monotonic() + 30
        while dht_pair[1].get("precision.all_averagers", latest=True) is None:
            assert time.monotonic() < deadline, "the donor's declaration never showed"
            time.sleep(0.2)
        assert newcomer.load_state_from_peers(timeout=20) is not None
        assert newcomer.local_epoch == 2
        assert model.weight.dtype == torch.float32
        assert torch.equal(model.weight, donor_model.weight.float()) and torch.equal(
            model.bias, donor_model.bias.float()
        )
        for mine, theirs in zip(newcomer.optimizer_parameters, donor.optimizer_parameters):
            for name in ("exp_avg", "exp_avg_sq"):
                local = newcomer.optimizer.state[mine][name]
                assert local.dtype == torch.float32
                assert torch.equal(local, donor.optimizer.state[theirs][name].float()), name
    finally:
        newcomer.shutdown()
        donor.shutdown()


def _download_into(tensors, expected):
    """The donor's ``tensors`` as a download decodes them into buffers of the ``expected`` dtypes."""
    messages = []
    for tensor in tensors:
        for chunk in split_for_streaming(serialize_torch_tensor(tensor, NoCompression().compression_type), 2**16):
            messages.append(averaging_pb2.DownloadData(tensor_part=chunk))
    messages[0].metadata = MSGPackSerializer.dumps({})
    assembler = StateAssembler(expected)
    parts = [finished for message in messages if (finished := assembler.add(message)) is not None]
    parts.append(assembler.finish())
    return [
        _decode_checked(assembler, index, chunks, torch.empty_like(template))
        for index, (chunks, template) in enumerate(zip(parts, expected))
    ]


@pytest.mark.parametrize("theirs", [torch.float64, torch.float16, torch.bfloat16])
def test_another_floating_point_precision_is_accepted(theirs):
    original = torch.randn(4).to(theirs)
    (tensor,) = _download_into([original], [torch.zeros(4)])
    assert tensor.dtype == torch.float32 and torch.equal(tensor, original.float())


@pytest.mark.parametrize("theirs, ours", [(torch.int64, torch.float32), (torch.float32, torch.int64)])
def test_other_kinds_of_dtype_are_still_refused(theirs, ours):
    with pytest.raises(StateDownloadError, match="decoded to"):
        _download_into([torch.ones(4, dtype=theirs)], [torch.zeros(4, dtype=ours)])


@pytest.mark.timeout(90)
def test_a_value_beyond_our_precision_refuses_the_donor_and_the_next_one_is_loaded():
    """A float64 donor whose state holds a value that float32 cannot hold (1e300 would become inf when cast) is
    refused, however it is loaded (a plain averager returns the state as it is, nothing checks it later): the next
    donor's state is returned, never an inf that the donor did not have."""
    first = DHT(start=True)
    dhts = [first, *(DHT(start=True, initial_peers=first.get_visible_maddrs()) for _ in range(2))]
    options = dict(prefix="beyond", start=True, target_group_size=2)
    huge, fine = torch.full((4,), 1.5, dtype=torch.float64), torch.full((4,), 2.5, dtype=torch.float64)
    huge[2] = 1e300
    donors = [
        DecentralizedAverager([tensor], dht, declare_state_period=1.0, **options)
        for tensor, dht in ((huge, dhts[0]), (fine, dhts[1]))
    ]
    newcomer = DecentralizedAverager([torch.zeros(4)], dhts[2], **options)
    try:
        donors[0].state_sharing_priority, donors[1].state_sharing_priority = 10.0, 1.0  # the huge one is asked first
        deadline = time.monotonic() + 30
        while sorted(e.value for e in getattr(dhts[2].get("beyond.all_averagers", latest=True), "value", {}).values())[
            -2:
        ] != [1.0, 10.0]:
            assert time.monotonic() < deadline, "the donors' declarations never showed"
            time.sleep(0.2)
        loaded = newcomer.load_state_from_peers(timeout=20)
        assert loaded is not None
        (tensor,) = loaded[1]
        assert tensor.dtype == torch.float32 and torch.equal(tensor, torch.full((4,), 2.5))
    finally:
        newcomer.shutdown()
        for donor in donors:
            donor.shutdown()
        for dht in reversed(dhts):
            dht.shutdown()


@pytest.mark.parametrize(
    "theirs, ours, value", [(torch.float64, torch.float32, 1e300), (torch.float32, torch.float16, 1e6)]
)
def test_a_cast_that_would_make_inf_is_refused(theirs, ours, value):
    with pytest.raises(StateDownloadError, match="beyond the range of"):
        _download_into([torch.tensor([1.0, value], dtype=theirs)], [torch.zeros(2, dtype=ours)])


@pytest.mark.parametrize("special", [float("inf"), float("nan")])
def test_inf_and_nan_that_the_donor_has_are_cast_as_they_are(special):
    (tensor,) = _download_into([torch.tensor([1.0, special], dtype=torch.float64)], [torch.zeros(2)])
    assert tensor.dtype == torch.float32 and tensor[0] == 1.0 and not torch.isfinite(tensor[1])
