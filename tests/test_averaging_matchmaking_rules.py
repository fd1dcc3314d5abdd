"""Matchmaking decisions as plain values: declared expirations, leader order, the leader's checks, group parsing."""

import dataclasses
import math

import pytest

from hivemind.averaging.matchmaking_rules import (
    MAX_GATHER_BYTES,
    MAX_GROUP_SIZE,
    Code,
    LeaderState,
    PotentialLeaders,
    SearchReport,
    check_join_request,
    declared_expiration,
    expected_group_size,
    may_start_early,
    parse_group,
)
from hivemind.p2p import PeerID
from hivemind.proto import averaging_pb2

ME, A, B, C = (PeerID(bytes([0x12, 0x20, i]) + b"\x00" * 31) for i in (5, 1, 2, 9))


def test_declared_expiration_is_scheduled_time_within_bounds():
    assert declared_expiration(scheduled_time=110, deadline=None, now=100, min_matchmaking_time=5) == 110
    assert declared_expiration(scheduled_time=101, deadline=None, now=100, min_matchmaking_time=5) == 105
    assert declared_expiration(scheduled_time=110, deadline=107, now=100, min_matchmaking_time=5) == 107


def test_leaders_are_tried_best_first_and_only_if_they_order_before_us():
    leaders = PotentialLeaders(ME)
    leaders.update([(ME, 10.0), (C, 10.0), (B, 8.0), (A, 9.0)])
    assert leaders.peers_seen == {A, B, C}
    assert leaders.pop_next_leader(own_expiration=10.0, now=0) == B  # expiration first
    assert leaders.pop_next_leader(own_expiration=10.0, now=0) == A
    assert leaders.pop_next_leader(own_expiration=10.0, now=0) is None  # C: same expiration, larger peer id
    assert leaders.pop_next_leader(own_expiration=None, now=0) == C  # a client-mode peer may ask anyone


def test_a_leader_is_asked_again_only_with_a_new_declaration():
    leaders = PotentialLeaders(ME)
    leaders.update([(A, 5.0)])
    assert leaders.pop_next_leader(10.0, now=0) == A
    leaders.update([(A, 5.0)])
    assert leaders.pop_next_leader(10.0, now=0) is None
    leaders.update([(A, 6.0)])
    assert leaders.pop_next_leader(10.0, now=0) == A


def test_expired_declarations_are_skipped():
    leaders = PotentialLeaders(ME)
    leaders.update([(A, 5.0), (B, 7.0)])
    assert leaders.pop_next_leader(10.0, now=6.0) == B


def _leader(**overrides) -> LeaderState:
    state = LeaderState(
        peer_id=ME,
        looking_for_group=True,
        assembled=False,
        client_mode=False,
        schema_hash=b"schema",
        current_key="mm.0b",
        declared_expiration=100.0,
        current_leader=None,
        followers={B},
        target_group_size=4,
    )
    return dataclasses.replace(state, **overrides)


def _request(**overrides) -> averaging_pb2.JoinRequest:
    fields = dict(schema_hash=b"schema", expiration=101.0, gather=b"\x93\xc0\x00\xc4\x01\xc0", group_key="mm.0b")
    fields.update(overrides)
    return averaging_pb2.JoinRequest(**fields)


def test_a_valid_request_is_accepted():
    assert check_join_request(_leader(), _request(), A) is None
    assert check_join_request(_leader(), _request(expiration=100.0), A) is None  # equal expirations are fine


@pytest.mark.parametrize(
    "leader, request_fields, requester, code",
    [
        (dict(looking_for_group=False), {}, A, Code.NOT_LOOKING_FOR_GROUP),
        (dict(assembled=True, client_mode=True), dict(schema_hash=b""), A, Code.NOT_LOOKING_FOR_GROUP),
        ({}, dict(schema_hash=b""), A, Code.PROTOCOL_VIOLATION),
        ({}, dict(expiration=math.inf), A, Code.PROTOCOL_VIOLATION),
        ({}, dict(expiration=math.nan), A, Code.PROTOCOL_VIOLATION),
        ({}, dict(gather=b"x" * (MAX_GATHER_BYTES + 1)), A, Code.PROTOCOL_VIOLATION),
        (dict(client_mode=True), dict(schema_hash=b"other"), A, Code.PROTOCOL_VIOLATION),
        (dict(declared_expiration=None), dict(schema_hash=b"other", group_key="x.0b"), A, Code.BAD_SCHEMA_HASH),
        (dict(declared_expiration=None), dict(group_key="mm.0b1"), A, Code.BAD_GROUP_KEY),
        (dict(declared_expiration=None, current_leader=C), {}, A, Code.NOT_DECLARED),
        (dict(current_leader=C), dict(expiration=99.0), A, Code.BAD_EXPIRATION_TIME),
        (dict(current_leader=C), {}, ME, Code.NOT_A_LEADER),
        (dict(followers={A, B, C}), {}, ME, Code.DUPLICATE_PEER_ID),
        ({}, {}, B, Code.DUPLICATE_PEER_ID),
        (dict(followers={B, C, ME}), {}, A, Code.GROUP_IS_FULL),
        (dict(target_group_size=None, followers=set(range(MAX_GROUP_SIZE - 1))), {}, A, Code.GROUP_IS_FULL),
    ],
)
def test_leader_checks_run_in_order(leader, request_fields, requester, code):
    reply = check_join_request(_leader(**leader), _request(**request_fields), requester)
    assert reply.code == code, Code.Name(reply.code)


def test_not_a_leader_suggests_the_current_leader():
    reply = check_join_request(_leader(current_leader=C), _request(), A)
    assert reply.suggested_leader == C.to_bytes()


def _group_message(**overrides) -> averaging_pb2.MessageFromLeader:
    fields = dict(
        code=Code.BEGIN_ALLREDUCE,
        group_id=b"g" * 20,
        ordered_peer_ids=[A.to_bytes(), ME.to_bytes()],
        gathered=[b"a", b"me"],
    )
    fields.update(overrides)
    return averaging_pb2.MessageFromLeader(**fields)


def test_parse_group():
    group = parse_group(_group_message(), ME, A)
    assert group.peer_ids == (A, ME) and group.gathered == (b"a", b"me") and group.group_size == 2


@pytest.mark.parametrize(
    "overrides",
    [
        dict(group_id=b""),
        dict(group_id=b"x" * 65),
        dict(gathered=[b"a"]),
        dict(ordered_peer_ids=[A.to_bytes(), A.to_bytes()]),
        dict(ordered_peer_ids=[A.to_bytes(), b""]),
        dict(ordered_peer_ids=[A.to_bytes(), B.to_bytes()]),  # without this peer
        dict(ordered_peer_ids=[B.to_bytes(), ME.to_bytes()]),  # without the leader
        dict(gathered=[b"a", b"x" * (MAX_GATHER_BYTES + 1)]),
    ],
)
def test_malformed_groups_are_refused(overrides):
    with pytest.raises(ValueError):
        parse_group(_group_message(**overrides), ME, A)


def test_report_names_the_likely_reason():
    report = SearchReport("mm.0b", min_group_size=3, client_mode=False)
    assert "the deadline passed before this peer could look for others under mm.0b" in report.explain(set())
    report = SearchReport("mm.0b", min_group_size=3, client_mode=False, dht_lookups=7)
    assert "no other averagers were found under the key mm.0b (7 DHT lookups)" in report.explain(set())
    report.replies[Code.BAD_SCHEMA_HASH] += 2
    report.bad_schema_peers.update({A, B})
    assert "schema hash differs from the peers seen: 2 of 2 peers" in report.explain({A, B})
    report = SearchReport("mm.0b", min_group_size=3, client_mode=False, largest_group=2, leader_timeouts=1)
    message = report.explain({A})
    assert "too small at the deadline: at most 2 of min_group_size=3 peers gathered, 1 other peers seen" in message
    assert "timed out waiting for the leader 1 time(s)" in message


def test_report_names_dht_calls_that_failed_or_ran_out_of_time():
    report = SearchReport("mm.0b", min_group_size=2, client_mode=False, dht_lookups=3, failed_lookups=3)
    message = report.explain(set())
    assert "could not read the averagers under mm.0b: all 3 of its DHT lookups failed or ran out of time" in message
    assert "no other averagers were found" not in message
    report = SearchReport("mm.0b", min_group_size=2, client_mode=False, dht_lookups=3, failed_lookups=1)
    message = report.explain(set())
    assert "no other averagers were found under the key mm.0b (3 DHT lookups)" in message
    assert "1 of 3 DHT lookups failed or ran out of time" in message
    report = SearchReport("mm.0b", min_group_size=2, client_mode=False, failed_declarations=2)
    message = report.explain(set())
    assert "the deadline passed before this peer could look for others" in message
    assert "2 store(s) of this peer's declaration failed or ran out of time" in message


def test_tried_declarations_are_forgotten_once_gone():
    leaders = PotentialLeaders(ME)
    leaders.update([(A, 5.0)])
    assert leaders.pop_next_leader(10.0, now=0) == A
    leaders.update([])
    assert leaders._tried == set()
    leaders.update([(A, 5.0)])  # seen again (a lookup had missed it): asking once more is harmless
    assert leaders.pop_next_leader(10.0, now=0) == A


@pytest.mark.parametrize(
    "group_size, expected, min_group_size, triggered, start",
    [
        (3, 3, 2, True, True),  # everyone expected is here and the round may begin
        (4, 3, 2, True, True),  # more than expected: nobody else is coming either
        (2, 3, 2, True, False),  # one expected peer is missing: wait for it until the declared time
        (3, 3, 2, False, False),  # complete, but this peer's own round is not due yet
        (3, 0, 2, True, False),  # nothing expected (unknown): wait as usual
        (1, 1, 1, True, False),  # alone: no group to start early
        (3, 3, 4, True, False),  # min_group_size, set explicitly, still wins
    ],
)
def test_a_leader_starts_early_only_with_every_expected_peer_once_triggered(
    group_size, expected, min_group_size, triggered, start
):
    assert may_start_early(group_size, expected, min_group_size, triggered) is start


def test_expected_group_size_reads_the_hint_of_a_step_and_defaults_to_unknown():
    class Step:
        pass

    step = Step()
    assert expected_group_size(step) == 0
    step.expected_group_size = 4
    assert expected_group_size(step) == 4
    for garbage in (-3, None, "many"):
        step.expected_group_size = garbage
        assert expected_group_size(step) == 0
