"""Properties of the epoch rules for any progress records the DHT's schema lets through (hostile values included):
the swarm's summary stays well defined, and no rule moves a peer further than the signed records allow."""

import math
from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from hivemind.optim.epoch_rule import (
    MAX_EPOCH,
    RefreshPolicy,
    count_expected_peers,
    epoch_after_gradient_round,
    is_synchronized,
    is_time_for_global_step,
    next_epoch,
    should_load_state,
    summarize_swarm,
)

NOW = 1_000_000.0


@dataclass
class Record:
    peer_id: bytes
    epoch: int
    samples_accumulated: int
    samples_per_second: float
    time: float
    client_mode: bool


# what LocalTrainingProgress accepts: ints >= 0 (the DHT's msgpack limits them to 2**64 - 1), floats >= 0 for the
# speed (inf included; NaN fails the bound), any float for the time
records = st.builds(
    Record,
    peer_id=st.sampled_from([b"a", b"b", b"c", b"d", b"me"]),
    epoch=st.one_of(st.integers(0, 5), st.integers(0, MAX_EPOCH)),
    samples_accumulated=st.one_of(st.integers(0, 100), st.integers(0, 2**64 - 1)),
    samples_per_second=st.one_of(st.floats(0, 1e3), st.floats(min_value=0), st.just(1e-20)),
    time=st.one_of(st.floats(NOW - 100, NOW + 100), st.floats()),
    client_mode=st.booleans(),
)
policies = st.builds(
    lambda low, extra, default: RefreshPolicy(low, low + extra, default),
    st.floats(0, 5),
    st.floats(0, 20),
    st.floats(0, 20),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(records, max_size=8), st.integers(1, 2**40), st.one_of(st.none(), records), policies)
def test_the_summary_of_any_records_is_well_defined(others, target, local, policy):
    if local is not None:
        local.peer_id = b"me"
    progress = summarize_swarm(others, target_batch_size=target, now=NOW, local_record=local, refresh_policy=policy)
    counted = [r for r in others if local is None or r.peer_id != b"me"] + ([local] if local is not None else [])
    assert progress.num_peers == len(counted)
    assert progress.epoch == max((r.epoch for r in counted), default=0)
    assert progress.samples_accumulated == sum(r.samples_accumulated for r in counted if r.epoch == progress.epoch)
    assert not math.isnan(progress.eta_next_epoch) and progress.eta_next_epoch >= NOW
    if counted:  # (with no record at all, not even this peer's own, the next fetch is due at once)
        assert NOW + policy.min_refresh_period <= progress.next_fetch_time <= NOW + policy.max_refresh_period
    if progress.samples_accumulated >= target:
        assert progress.eta_next_epoch == NOW and is_time_for_global_step(progress.epoch, progress, NOW)


@settings(max_examples=300, deadline=None)
@given(st.lists(records, min_size=1, max_size=8), st.integers(1, 1000), st.floats(0, 1e6))
def test_once_the_epoch_is_due_it_stays_due(others, target, later):
    progress = summarize_swarm(others, target_batch_size=target, now=NOW)
    local_epoch = progress.epoch
    if is_time_for_global_step(local_epoch, progress, NOW):
        assert is_time_for_global_step(local_epoch, progress, NOW + later)


@given(st.integers(0, MAX_EPOCH), st.integers(0, MAX_EPOCH))
def test_the_next_epoch_moves_on_and_never_past_the_swarm_by_more_than_one(local, swarm_epoch):
    epoch = next_epoch(local, swarm_epoch)
    assert epoch > local and epoch == max(local + 1, swarm_epoch)
    assert is_synchronized(epoch, swarm_epoch)


@given(
    st.integers(0, 2**40),
    st.integers(0, 2**40),
    st.lists(st.one_of(st.integers(-5, 2**64), st.booleans(), st.none(), st.floats(), st.text(max_size=3))),
)
def test_a_gradient_round_moves_a_peer_at_most_one_past_the_signed_epoch_or_two_past_its_own(
    local, swarm_epoch, epochs
):
    epoch = epoch_after_gradient_round(local, swarm_epoch, epochs)
    assert next_epoch(local, swarm_epoch) <= epoch <= max(swarm_epoch, local + 1) + 1
    honest = [value for value in epochs if type(value) is int and local < value <= max(swarm_epoch, local + 1)]
    assert epoch == max([next_epoch(local, swarm_epoch)] + [value + 1 for value in honest])


@given(st.integers(0, 2**40), st.integers(0, 2**40))
def test_the_strict_check_loads_whenever_the_lenient_one_does(local, swarm_epoch):
    if should_load_state(local, swarm_epoch, strict=False):
        assert should_load_state(local, swarm_epoch, strict=True)
    assert should_load_state(local, swarm_epoch, strict=False) == (not is_synchronized(local, swarm_epoch))


@settings(max_examples=300, deadline=None)
@given(
    st.lists(records, max_size=8),
    st.integers(0, 6),
    st.one_of(st.none(), st.sets(st.sampled_from([b"a", b"b", b"c"]))),
    st.floats(NOW - 200, NOW + 200),
    st.floats(0, 100),
)
def test_expected_peers_are_distinct_live_peers_and_grow_with_an_earlier_epoch_start(
    others, local_epoch, last_round, started_at, earlier
):
    expected = count_expected_peers(others, local_epoch, last_round, started_at)
    assert 0 <= expected <= len({r.peer_id for r in others})
    assert expected <= len({r.peer_id for r in others if r.epoch >= local_epoch - 1})
    assert count_expected_peers(others, local_epoch, last_round, started_at - earlier) >= expected
    assert count_expected_peers(others, local_epoch, None, started_at) >= expected


@given(policies, st.one_of(st.floats(), st.floats(-1e9, 1e9)), st.integers(0, 10**6))
def test_the_refresh_delay_is_always_within_its_bounds(policy, time_to_eta, num_peers):
    delay = policy.delay(time_to_eta, num_peers)
    assert policy.min_refresh_period <= delay <= policy.max_refresh_period
