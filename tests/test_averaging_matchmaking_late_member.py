"""Regression: with min_group_size=3, two honest peers waiting for a third disband each other's too-small
groups; after two such disbands each excluded the other for the rest of the search, so once the third peer came, no
group of three could form before the deadline (seen with real averagers: 'at most 2 of min_group_size=3 peers
gathered, 2 other peers seen'). A peer never seen before in the search makes those disbands forgiven."""

from hivemind.averaging.matchmaking_rules import MAX_DISBANDS_PER_LEADER, PotentialLeaders
from hivemind.p2p import PeerID

ME, LEADER, NEWCOMER, OTHER = (PeerID(bytes([0x12, 0x20, i]) + b"\x00" * 31) for i in (5, 1, 9, 3))


def _excluded_after_disbands() -> PotentialLeaders:
    leaders = PotentialLeaders(ME)
    leaders.update([(LEADER, 5.0)])
    for _ in range(MAX_DISBANDS_PER_LEADER):
        leaders.report_disband(LEADER)
    leaders.update([(LEADER, 6.0)])  # it re-declares: still not asked
    assert leaders.pop_next_leader(10.0, now=0) is None
    return leaders


def test_a_leader_that_disbanded_too_small_groups_is_asked_again_once_a_new_peer_appears():
    leaders = _excluded_after_disbands()
    leaders.update([(LEADER, 7.0), (NEWCOMER, 12.0)])
    assert leaders.pop_next_leader(10.0, now=0) == LEADER


def test_a_leader_that_keeps_disbanding_a_fixed_set_of_peers_stays_excluded():
    leaders = _excluded_after_disbands()
    leaders.update([(LEADER, 7.0)])
    leaders.update([(LEADER, 8.0)])
    assert leaders.pop_next_leader(10.0, now=0) is None
