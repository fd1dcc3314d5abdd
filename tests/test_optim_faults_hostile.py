"""Progress records and donor states with hostile values: a peer keeps training and keeps its epoch usable."""

import math
import time

import pytest
import torch

from hivemind.dht import DHT
from hivemind.optim.epoch_rule import MAX_EPOCH, RefreshPolicy, summarize_swarm
from hivemind.optim.optimizer import Optimizer
from hivemind.optim.progress_tracker import LocalTrainingProgress, ProgressTracker
from hivemind.optim.state_averager import TrainingStateAverager
from hivemind.utils.timed_storage import get_dht_time

FAST_TRACKER = dict(min_refresh_period=0.05, max_refresh_period=0.3, default_refresh_period=0.1)


def wait_for(condition, timeout=15.0, interval=0.02):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)


@pytest.fixture(scope="module")
def dht_pair():
    first = DHT(start=True)
    second = DHT(initial_peers=first.get_visible_maddrs(), start=True)
    yield first, second
    second.shutdown()
    first.shutdown()


def publish_hostile_record(dht: DHT, prefix: str, **fields) -> None:
    """Store a signed record that passes the DHT schema (as any peer can) but carries absurd values."""
    signer = ProgressTracker(dht, prefix, target_batch_size=1, start=False)  # registers the run's validators
    record = dict(peer_id=b"hostile", epoch=0, samples_accumulated=0, samples_per_second=0.0,
                  time=get_dht_time(), client_mode=False)  # fmt: skip
    record.update(fields)
    assert dht.store(f"{prefix}_progress", subkey=signer._local_public_key, value=record,
                     expiration_time=get_dht_time() + 60)  # fmt: skip


HOSTILE_RECORDS = {  # values that pass the DHT schema; what it refuses (negative, NaN speed, types) never arrives
    "epoch-at-uint64-max": dict(epoch=2**64 - 1),
    "huge-samples-huge-speed-nan-time": dict(
        samples_accumulated=2**64 - 1, samples_per_second=1e308, time=float("nan")
    ),
}


@pytest.mark.parametrize(
    "fields",
    [
        dict(samples_per_second=float("inf"), time=-1e308),
        dict(samples_per_second=1e308, time=-1e308),
        dict(samples_per_second=1.0, time=float("nan")),
        dict(samples_per_second=1.0, time=float("inf")),
        dict(samples_per_second=1.0, time=float("-inf")),
        dict(samples_accumulated=2**64 - 1, samples_per_second=1e308),
        dict(epoch=MAX_EPOCH, samples_accumulated=2**64 - 1),
    ],
)
def test_swarm_summary_stays_well_defined_for_absurd_record_values(fields):
    now = 1000.0
    record = dict(peer_id=b"hostile", epoch=0, samples_accumulated=0, samples_per_second=0.0, time=now,
                  client_mode=False)  # fmt: skip
    record.update(fields)
    local = LocalTrainingProgress(peer_id=b"me", epoch=0, samples_accumulated=3, samples_per_second=1.0, time=now,
                                  client_mode=False)  # fmt: skip
    progress = summarize_swarm([LocalTrainingProgress(**record)], target_batch_size=8, now=now, local_record=local)
    assert progress.num_peers == 2 and progress.epoch == record["epoch"]
    assert progress.eta_next_epoch >= now and not math.isnan(progress.eta_next_epoch)
    assert now < progress.next_fetch_time <= now + RefreshPolicy().max_refresh_period


@pytest.mark.timeout(60)
@pytest.mark.parametrize("fields", list(HOSTILE_RECORDS.values()), ids=list(HOSTILE_RECORDS))
def test_an_optimizer_keeps_training_and_publishing_next_to_a_hostile_progress_record(dht_pair, fields):
    honest_dht, hostile_dht = dht_pair
    run_id = f"hostile_{abs(hash(str(fields)))}"
    publish_hostile_record(hostile_dht, run_id, **fields)
    model = torch.nn.Linear(4, 1)
    opt = Optimizer(
        dht=honest_dht, run_id=run_id, target_batch_size=8, batch_size_per_step=4,
        optimizer=lambda params: torch.optim.SGD(params, lr=0.1), params=model.parameters(),
        matchmaking_time=0.5, averaging_timeout=1.0, tracker_opts=FAST_TRACKER,
        averager_opts=dict(request_timeout=0.3), load_state_timeout=2.0,
    )  # fmt: skip

    def published_epoch_of_honest_peer():
        response = hostile_dht.get(f"{run_id}_progress", latest=True)
        for entry in response.value.values() if response is not None else ():
            if isinstance(entry.value, dict) and entry.value.get("peer_id") == honest_dht.peer_id.to_bytes():
                return entry.value["epoch"]

    try:
        opt.tracker.refresh_global_progress(timeout=10)
        start_epoch = opt.local_epoch
        x, y = torch.randn(4, 4), torch.randn(4, 1)
        while opt.local_epoch < start_epoch + 2:
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        assert opt.local_epoch <= MAX_EPOCH + 2, "an epoch that large can no longer be published"
        assert all(torch.isfinite(param).all() for param in model.parameters())
        # the honest peer's own record still reaches the DHT (another peer sees its current epoch)
        wait_for(lambda: published_epoch_of_honest_peer() == opt.local_epoch)
    finally:
        opt.shutdown()


@pytest.mark.timeout(30)
def test_a_tracker_ignores_a_record_beyond_the_largest_usable_epoch(dht_pair):
    honest_dht, hostile_dht = dht_pair
    publish_hostile_record(hostile_dht, "absurd_epoch", epoch=2**64 - 1, samples_accumulated=5)
    tracker = ProgressTracker(honest_dht, "absurd_epoch", target_batch_size=8, start=True, **FAST_TRACKER)
    try:
        assert tracker.refresh_global_progress(timeout=10)
        assert tracker.global_epoch == 0 and tracker.global_progress.num_peers == 1
    finally:
        tracker.shutdown()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("epoch", [MAX_EPOCH + 1, 2**64 - 1])
def test_a_donor_state_beyond_the_largest_usable_epoch_is_refused(dht_pair, epoch):
    model = torch.nn.Linear(2, 1)
    averager = TrainingStateAverager(
        dht=dht_pair[0], prefix=f"absurd_donor_{epoch}", optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
        params=model.parameters(), start=True,
    )  # fmt: skip
    try:
        metadata, tensors, _ = averager.get_current_state()
        before = [tensor.clone() for tensor in model.parameters()]
        with pytest.raises(ValueError, match="epoch"):
            averager._apply_downloaded_state(dict(metadata, epoch=epoch), [torch.ones_like(t) for t in tensors])
        assert averager.local_epoch == 0
    finally:
        averager.shutdown()
    assert all(torch.equal(param, old) for param, old in zip(model.parameters(), before))
