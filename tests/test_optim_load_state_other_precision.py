"""A donor that keeps its model (and so its optimizer statistics) in another floating-point precision than the
newcomer's: its state is loaded, cast into the newcomer's tensors (as 1.1.12 loads it); other dtypes are refused."""

import time

import pytest
import torch

from hivemind.averaging.state_download import StateAssembler, StateDownloadError, decode_chunks
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


def _assemble(tensors, expected):
    messages = []
    for tensor in tensors:
        for chunk in split_for_streaming(serialize_torch_tensor(tensor, NoCompression().compression_type), 2**16):
            messages.append(averaging_pb2.DownloadData(tensor_part=chunk))
    messages[0].metadata = MSGPackSerializer.dumps({})
    assembler = StateAssembler(expected)
    parts = [finished for message in messages if (finished := assembler.add(message)) is not None]
    parts.append(assembler.finish())
    for index, chunks in enumerate(parts):
        assembler.check_decoded(index, decode_chunks(chunks))


@pytest.mark.parametrize("theirs", [torch.float64, torch.float16, torch.bfloat16])
def test_another_floating_point_precision_is_accepted(theirs):
    _assemble([torch.randn(4).to(theirs)], [torch.zeros(4)])


@pytest.mark.parametrize("theirs, ours", [(torch.int64, torch.float32), (torch.float32, torch.int64)])
def test_other_kinds_of_dtype_are_still_refused(theirs, ours):
    with pytest.raises(StateDownloadError, match="decoded to"):
        _assemble([torch.ones(4, dtype=theirs)], [torch.zeros(4, dtype=ours)])
