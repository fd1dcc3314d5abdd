"""Public names that 1.1.12's objects have and code written for it may use, used here the way such code would.

Each name exists in 1.1.12 (listed there with dir() on live objects) and means the same thing here: see
docs/compatibility.md for the names that are left out and why."""

import re
import threading
import time
import typing

import pytest
import torch
from optim_swarm_helpers import FAST_TRACKER, dht_pair, wait_for

from hivemind.averaging import DecentralizedAverager
from hivemind.compression import Float16Compression
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.protocol import DHTProtocol
from hivemind.moe.server.module_backend import ModuleBackend
from hivemind.moe.server.runtime import Runtime
from hivemind.optim.grad_averager import GradientAverager
from hivemind.optim.progress_tracker import ProgressTracker
from hivemind.optim.state_averager import TrainingStateAverager
from hivemind.p2p import P2P, P2PContext
from hivemind.utils.crypto import RSAPrivateKey
from hivemind.utils.serializer import MSGPackSerializer
from hivemind.utils.tensor_descr import BatchTensorDescriptor

__all__ = ["dht_pair"]  # the fixture, used below


def test_dht_protocol_reserved_subkeys_are_the_regular_and_dictionary_markers():
    assert DHTProtocol.RESERVED_SUBKEYS == (DHTProtocol.IS_REGULAR_VALUE, DHTProtocol.IS_DICTIONARY) == (b"\xc0", b"")
    # a user's subkey never takes one of them: subkeys are sent msgpack-encoded, and None is the regular value
    assert MSGPackSerializer.dumps("") not in DHTProtocol.RESERVED_SUBKEYS


def test_signature_validator_tag_formats_build_and_find_owner_tags():
    validator = RSASignatureValidator(RSAPrivateKey())
    public_key = re.search(RSASignatureValidator.PUBLIC_KEY_REGEX, validator.local_public_key).group(1)
    assert public_key.startswith(b"ssh-rsa ")
    assert RSASignatureValidator.PUBLIC_KEY_FORMAT.replace(b"_key_", public_key) == validator.local_public_key
    assert RSASignatureValidator.SIGNATURE_FORMAT.replace(b"_value_", b"c2ln") == b"[signature:c2ln]"


async def echo_handler(requests: "P2P.TInputStream", context: P2PContext) -> "P2P.TOutputStream":
    async for request in requests:
        yield request


def test_p2p_type_names_annotate_stream_handlers():
    hints = typing.get_type_hints(echo_handler)
    assert hints["requests"] == typing.AsyncIterator[P2P.TInputProtobuf]
    assert hints["return"] == typing.AsyncIterator[P2P.TOutputProtobuf]
    assert isinstance(P2P.TInputProtobuf, typing.TypeVar) and isinstance(P2P.TOutputProtobuf, typing.TypeVar)


@pytest.mark.parametrize("averager_cls", [DecentralizedAverager, TrainingStateAverager, GradientAverager])
def test_averagers_name_the_serializer_of_their_metadata(averager_cls):
    assert averager_cls.serializer is MSGPackSerializer
    metadata = {"epoch": 3, "names": ["a", "b"]}
    assert averager_cls.serializer.loads(averager_cls.serializer.dumps(metadata)) == metadata


@pytest.mark.timeout(30)
def test_averager_allreduce_kwargs_are_the_options_it_was_given(dht_pair):
    compression = Float16Compression()
    averager = DecentralizedAverager(
        [torch.zeros(3)], dht=dht_pair[0], prefix="compat_kwargs", start=False, compression=compression,
        part_size_bytes=2**16, sender_timeout=3.0, reducer_timeout=7.0,
    )  # fmt: skip
    assert averager.allreduce_kwargs == dict(
        compression=compression, part_size_bytes=2**16, min_vector_size=0, sender_timeout=3.0, reducer_timeout=7.0
    )
    derived = DecentralizedAverager([torch.zeros(3)], dht=dht_pair[0], prefix="compat_kwargs2", start=False)
    assert derived.allreduce_kwargs["sender_timeout"] is None  # derived from measured rounds here
    assert derived.allreduce_kwargs["reducer_timeout"] is None


def offloaded_sgd_averager(dht, prefix: str):
    """A linear model and its started TrainingStateAverager (SGD, lr 0.1, offloaded); gradients of ones are set."""
    model = torch.nn.Linear(4, 2)
    averager = TrainingStateAverager(
        dht=dht, optimizer=lambda params: torch.optim.SGD(params, lr=0.1), params=model.parameters(),
        offload_optimizer=True, prefix=prefix, start=True,
    )  # fmt: skip
    for param in model.parameters():
        param.grad = torch.ones_like(param)
    return model, averager


@pytest.mark.timeout(60)
def test_state_averager_background_step_through_its_executor_lock_and_pending_updates(dht_pair):
    model, averager = offloaded_sgd_averager(dht_pair[0], "compat_attrs")
    try:
        assert averager.reuse_tensors is False  # the averaged tensors are separate buffers here
        assert averager.pending_updates == set()
        assert averager.step_executor.submit(lambda: 42).result(10) == 42

        entered, release = threading.Event(), threading.Event()
        inner_step = averager.optimizer.step
        averager.optimizer.step = lambda *args, **kwargs: (
            entered.set(),
            release.wait(30),
            inner_step(*args, **kwargs),
        )[-1]
        before = model.weight.detach().clone()
        averager.step(optimizer_step=True, delay_optimizer_step=True)
        (pending,) = averager.pending_updates
        assert entered.wait(10) and not pending.done()
        # the background step holds lock_optimizer: a user who takes it waits for the step to end
        assert not averager.lock_optimizer.acquire(timeout=0.2)
        release.set()
        with averager.lock_optimizer:
            pass
        pending.result(10)
        assert averager.pending_updates == {pending}  # finished, not yet applied to the model
        averager.step()  # applies it
        assert averager.pending_updates == set()
        assert torch.allclose(model.weight, before - 0.1)
    finally:
        averager.shutdown()


@pytest.mark.timeout(60)
def test_progress_tracker_lock_pauses_updates_and_shutdown_triggered_stops_it(dht_pair):
    tracker = ProgressTracker(dht_pair[0], "compat_attrs", 100, start=True, **FAST_TRACKER)
    observer = ProgressTracker(dht_pair[1], "compat_attrs", 100, start=True, **FAST_TRACKER)
    try:
        with tracker.lock_global_progress:  # holding it keeps local reports from the global progress
            reporter = threading.Thread(target=tracker.report_local_progress, args=(0, 10))
            reporter.start()
            time.sleep(0.2)
            assert tracker.global_progress.samples_accumulated == 0
        reporter.join(10)
        assert tracker.global_progress.samples_accumulated == 10
        wait_for(lambda: observer.others_alive(5))

        assert not tracker.shutdown_triggered.is_set()
        tracker.shutdown_triggered.set()  # as a user of 1.1.12 may stop it
        tracker.join(10)
        assert not tracker.is_alive()
        wait_for(lambda: observer.others_alive(5) is False)  # it published that it left, as on shutdown()
    finally:
        for each in (tracker, observer):
            each.shutdown(5)


class CountingRuntime(Runtime):
    """A Runtime subclass of the kind written for 1.1.12: it watches every batch through process_batch."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen = []

    def process_batch(self, pool, batch_index, *batch):
        outputs, batch_size = super().process_batch(pool, batch_index, *batch)
        self.seen.append((pool.name, batch_size, len(outputs)))
        return outputs, batch_size


@pytest.mark.timeout(30)
def test_runtime_computes_every_batch_through_process_batch():
    module = torch.nn.Linear(3, 2)
    backend = ModuleBackend("expert.0", module, args_schema=(BatchTensorDescriptor(3),), max_batch_size=8)
    runtime = CountingRuntime({"expert.0": backend}, device=None)
    runtime.start()
    try:
        assert runtime.ready.wait(10)
        inputs = torch.randn(4, 3)
        (output,) = backend.forward_pool.submit_task(inputs).result(timeout=10)
        assert torch.allclose(output, module(inputs))
        assert runtime.seen == [("expert.0_forward", 4, 1)]
        # called directly, it computes a batch without sending it anywhere, as in 1.1.12
        outputs, batch_size = runtime.process_batch(backend.forward_pool, 0, inputs[:2])
        assert batch_size == 2 and torch.allclose(outputs[0], output[:2])
    finally:
        runtime.shutdown(timeout=10)


def test_module_backend_loads_a_state_dict_passed_by_keyword():
    backend = ModuleBackend(
        "expert.0", torch.nn.Linear(3, 2), args_schema=(BatchTensorDescriptor(3),), max_batch_size=8
    )
    saved = backend.state_dict()
    with torch.no_grad():
        backend.module.weight.zero_()
    backend.load_state_dict(state_dict=saved)  # the keyword of 1.1.12 (and of torch's load_state_dict)
    assert torch.equal(backend.module.weight, saved["module"]["weight"])


@pytest.mark.timeout(60)
def test_a_step_under_lock_optimizer_that_would_wait_for_the_background_step_raises_instead_of_hanging(dht_pair):
    # the background step needs lock_optimizer: waiting for it while holding the lock would hang forever
    model, averager = offloaded_sgd_averager(dht_pair[0], "compat_lock_step")
    try:
        before, outcome = model.weight.detach().clone(), []

        def steps_under_the_lock():
            with averager.lock_optimizer:
                averager.step(optimizer_step=True, delay_optimizer_step=True)
                try:
                    averager.step(optimizer_step=True, delay_optimizer_step=True)
                    outcome.append("returned")
                except RuntimeError as e:
                    outcome.append(e)

        user = threading.Thread(target=steps_under_the_lock, daemon=True)
        user.start()
        user.join(10)
        assert not user.is_alive(), "step() under lock_optimizer waited forever for the background step"
        assert isinstance(outcome[0], RuntimeError) and "lock_optimizer" in str(outcome[0])
        (pending,) = averager.pending_updates  # the first step runs once the lock is released
        pending.result(10)
        averager.step()
        assert torch.allclose(model.weight, before - 0.1)  # the one step that was queued, applied
    finally:
        averager.shutdown()
