"""A declared leader that never answers a join request (no ACCEPTED, no refusal) within request_timeout is asked at
most twice per search, whatever it declares next: one that re-declared just ahead of everyone, with a new expiration
each time, was asked at every declaration and kept followers from ever reaching the honest leader behind it (the
hostile matchmaking test's silent variant then failed to group within 12 s on a loaded worker)."""

from hivemind.averaging.matchmaking_rules import MAX_SILENCES_PER_LEADER, PotentialLeaders
from hivemind.p2p import PeerID

ME, HOSTILE, HONEST = (PeerID(bytes([0x12, 0x20, i]) + b"\x00" * 31) for i in (5, 1, 2))


def test_a_leader_silent_twice_is_not_asked_again_whatever_it_declares():
    leaders = PotentialLeaders(ME)
    for silence in range(MAX_SILENCES_PER_LEADER):
        leaders.update([(HOSTILE, 5.0 + silence), (HONEST, 9.0)])  # a new declaration ahead of the honest one
        assert leaders.pop_next_leader(own_expiration=10.0, now=0) == HOSTILE
        leaders.report_silence(HOSTILE)
    leaders.update([(HOSTILE, 7.5), (HONEST, 9.0)])
    assert leaders.is_excluded(HOSTILE)
    assert leaders.pop_next_leader(own_expiration=10.0, now=0) == HONEST


def test_one_silence_is_forgiven():
    """An honest leader on a loaded machine may miss one request_timeout: it is still asked at its next declaration."""
    leaders = PotentialLeaders(ME)
    leaders.update([(HONEST, 5.0)])
    assert leaders.pop_next_leader(own_expiration=10.0, now=0) == HONEST
    leaders.report_silence(HONEST)
    leaders.update([(HONEST, 6.0)])
    assert not leaders.is_excluded(HONEST)
    assert leaders.pop_next_leader(own_expiration=10.0, now=0) == HONEST
