"""A training averager made with initialize_optimizer=False (its template holds optimizer statistics made for the
occasion) takes a donor's state with or without statistics in one download: a state without them is the template's
prefix. Anything else that differs from the template is still refused, and a refused state changes nothing."""

import time

import pytest
import torch

from hivemind.averaging.state_download import StateAssembler, StateDownloadError, decode_chunks
from hivemind.compression import NoCompression, serialize_torch_tensor
from hivemind.dht import DHT
from hivemind.optim.state_averager import TrainingStateAverager
from hivemind.optim.training_averager import TrainingAverager
from hivemind.proto import averaging_pb2
from hivemind.utils import MSGPackSerializer
from hivemind.utils.streaming import split_for_streaming


@pytest.fixture
def dhts():
    first = DHT(start=True)
    others = [DHT(start=True, initial_peers=first.get_visible_maddrs()) for _ in range(2)]
    yield [first, *others]
    for dht in reversed(others):
        dht.shutdown()
    first.shutdown()


class _Counting(TrainingStateAverager):
    """Counts its download attempts; ``cut_statistics``: serves its metadata whole but not its statistics (as a
    donor that died at the end of its parameters would). The same class on every side: its name is in the handler's."""

    attempts = 0
    cut_statistics = False

    def _load_state_from_peers_excluding(self, exclude, timeout=None, **kwargs):
        self.attempts += 1
        return super()._load_state_from_peers_excluding(exclude, timeout=timeout, **kwargs)

    def get_current_state(self):
        metadata, tensors, infos = super().get_current_state()
        if self.cut_statistics:
            num_local = len(self.optimizer_parameters) + len(self.extra_tensors)
            return metadata, tensors[:num_local], infos[:num_local]
        return metadata, tensors, infos


def _averager(dht, model, prefix, cls=_Counting, initialize_optimizer=False, **kwargs):
    return cls(
        dht=dht, optimizer=lambda params: torch.optim.Adam(params, lr=0.1), params=model.parameters(),
        initialize_optimizer=initialize_optimizer, prefix=prefix, start=True, **kwargs,
    )  # fmt: skip


def _wait_for_donors(dht, prefix, count, timeout=30.0):
    deadline = time.monotonic() + timeout
    while True:
        entry = dht.get(f"{prefix}.all_averagers", latest=True)
        if entry is not None and len(entry.value) >= count:
            return
        assert time.monotonic() < deadline, "the donors' declarations never showed"
        time.sleep(0.2)


@pytest.mark.timeout(90)
def test_donors_without_statistics_are_downloaded_from_once(dhts):
    """Donors made alike that have not stepped share no statistics: one download of one donor, not one per donor
    with statistics and one more without (which took twice the time and could run out of it)."""
    torch.manual_seed(0)
    models = [torch.nn.Linear(3, 2) for _ in dhts]
    donors = [_averager(dht, model, "nostat_once", declare_state_period=1.0) for dht, model in zip(dhts[:2], models)]
    newcomer = _averager(dhts[2], models[2], "nostat_once")
    try:
        for donor in donors:
            donor.local_epoch = 4
        _wait_for_donors(dhts[2], "nostat_once", 2)
        loaded = newcomer.load_state_from_peers(timeout=20)
        assert loaded is not None
        assert newcomer.attempts == 1
        assert newcomer.local_epoch == 4
        assert torch.equal(models[2].weight, models[0].weight) or torch.equal(models[2].weight, models[1].weight)
        assert not newcomer.optimizer.state  # as the donors': a fresh optimizer's
        assert len(loaded[1]) == 2  # the parameters alone
    finally:
        newcomer.shutdown()
        for donor in donors:
            donor.shutdown()


@pytest.mark.timeout(90)
def test_donor_with_statistics_is_loaded_whole_in_one_download(dhts):
    torch.manual_seed(0)
    models = [torch.nn.Linear(3, 2) for _ in dhts[:2]]
    donor = _averager(dhts[0], models[0], "nostat_full", initialize_optimizer=True, declare_state_period=1.0)
    newcomer = _averager(dhts[1], models[1], "nostat_full")
    try:
        models[0].weight.grad = torch.ones_like(models[0].weight)
        models[0].bias.grad = torch.ones_like(models[0].bias)
        donor.step(optimizer_step=True)
        donor.local_epoch = 1
        _wait_for_donors(dhts[1], "nostat_full", 1)
        assert newcomer.load_state_from_peers(timeout=20) is not None
        assert newcomer.attempts == 1 and newcomer.local_epoch == 1
        assert torch.equal(models[1].weight, models[0].weight)
        for mine, theirs in zip(newcomer.optimizer_parameters, donor.optimizer_parameters):
            for name, value in donor.optimizer.state[theirs].items():
                assert torch.equal(newcomer.optimizer.state[mine][name], value), name
    finally:
        newcomer.shutdown()
        donor.shutdown()


@pytest.mark.timeout(90)
def test_a_state_cut_where_its_statistics_begin_is_never_applied(dhts):
    """The donor's metadata lists statistics that never came (as when it dies right after its parameters): the
    state looks like one without statistics to the stream, and is refused all the same."""
    torch.manual_seed(0)
    models = [torch.nn.Linear(3, 2) for _ in dhts[:2]]
    donor = _averager(dhts[0], models[0], "nostat_cut", initialize_optimizer=True, declare_state_period=1.0)
    donor.cut_statistics = True
    newcomer = _averager(dhts[1], models[1], "nostat_cut")
    before = models[1].weight.detach().clone()
    try:
        donor.local_epoch = 5
        _wait_for_donors(dhts[1], "nostat_cut", 1)
        assert newcomer.load_state_from_peers(timeout=20) is None
        assert torch.equal(models[1].weight, before) and newcomer.local_epoch == 0
        assert not newcomer.optimizer.state
    finally:
        newcomer.shutdown()
        donor.shutdown()


@pytest.mark.timeout(90)
def test_legacy_averager_loads_a_donor_without_statistics_once(dhts):
    torch.manual_seed(0)
    models = [torch.nn.Linear(3, 2) for _ in dhts[:2]]
    opts = [torch.optim.Adam(model.parameters(), lr=0.1) for model in models]
    options = dict(average_parameters=True, average_gradients=False, prefix="nostat_ta", start=True)
    donor = TrainingAverager(opts[0], dht=dhts[0], initialize_optimizer=False, declare_state_period=1.0, **options)
    newcomer = TrainingAverager(opts[1], dht=dhts[1], initialize_optimizer=False, **options)
    calls = []
    original = newcomer._load_state_from_peers_excluding
    newcomer._load_state_from_peers_excluding = lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs)
    try:
        _wait_for_donors(dhts[1], "nostat_ta", 1)
        assert newcomer.load_state_from_peers(timeout=20) is not None
        assert len(calls) == 1
        assert torch.equal(models[1].weight, models[0].weight) and not opts[1].state
    finally:
        newcomer.shutdown()
        donor.shutdown()


# ---------------------------------------------------------------- the stream check alone (no network)


def _messages(tensors):
    messages = []
    for tensor in tensors:
        for chunk in split_for_streaming(serialize_torch_tensor(tensor, NoCompression().compression_type), 2**16):
            messages.append(averaging_pb2.DownloadData(tensor_part=chunk))
    messages = messages or [averaging_pb2.DownloadData()]
    messages[0].metadata = MSGPackSerializer.dumps({"epoch": 0})
    return messages


def _assemble(tensors, expected, optional_tail):
    assembler = StateAssembler(expected, optional_tail=optional_tail)
    parts = [finished for message in _messages(tensors) if (finished := assembler.add(message)) is not None]
    last = assembler.finish()
    parts += [last] if last is not None else []
    decoded = [decode_chunks(chunks) for chunks in parts]
    for index, tensor in enumerate(decoded):
        assembler.check_decoded(index, tensor)
    return decoded


TEMPLATE = [torch.zeros(3, 2), torch.zeros(2), torch.zeros(3, 2), torch.zeros(2), torch.zeros(()), torch.zeros(())]


@pytest.mark.parametrize("count", [2, 6])
def test_a_state_with_or_without_the_optional_tail_is_whole(count):
    tensors = [torch.randn_like(t) for t in TEMPLATE[:count]]
    decoded = _assemble(tensors, TEMPLATE, optional_tail=4)
    assert len(decoded) == count and all(torch.equal(a, b) for a, b in zip(decoded, tensors))


@pytest.mark.parametrize(
    "tensors, reason",
    [
        (TEMPLATE[:1], "ended after 1 of 6 expected tensors (or 2, without the optional last 4): the donor's state"),
        (TEMPLATE[:3], "ended after 3 of 6"),  # a part of the tail only
        (TEMPLATE[:5], "ended after 5 of 6"),
        ([*TEMPLATE, torch.zeros(())], "more tensors than the 6 expected"),
        ([torch.zeros(2, 3), *TEMPLATE[1:2]], "tensor 0 has shape [2, 3], expected [3, 2]"),  # another model's
        ([TEMPLATE[0], torch.zeros(2, dtype=torch.int64)], "tensor 1 decoded to"),
    ],
)
def test_anything_else_is_still_refused(tensors, reason):
    with pytest.raises(StateDownloadError, match=reason.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        _assemble(tensors, TEMPLATE, optional_tail=4)


def test_a_state_shorter_than_ours_is_refused_saying_what_it_may_be():
    """A donor that has no optimizer statistics (a fresh peer) for a newcomer that has some: refused, as 1.1.12 does,
    saying that the states differ, not only that the stream ended early (which reads as a cut)."""
    with pytest.raises(StateDownloadError, match="ended after 2 of 6 expected tensors: the donor's state has fewer"):
        _assemble(TEMPLATE[:2], TEMPLATE, optional_tail=0)


def test_the_optional_tail_cannot_exceed_the_template():
    with pytest.raises(ValueError, match="optional_tail"):
        StateAssembler(TEMPLATE, optional_tail=7)
