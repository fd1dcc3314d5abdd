"""Matchmaking decisions without I/O: declared expirations, whom to ask to lead, the leader's checks of a join
request, the check of a leader's group message, and why a search failed."""

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, Iterable, Optional, Set, Tuple

from hivemind.averaging.group_info import GroupInfo
from hivemind.averaging.key_manager import MAX_PEER_ID_BYTES
from hivemind.averaging.payload import MAX_GROUP_GATHER_ITEMS, MalformedGatherError, decode_gather
from hivemind.p2p import PeerID
from hivemind.proto import averaging_pb2
from hivemind.utils.timed_storage import DHTExpiration

MAX_GATHER_BYTES = 256 * 1024  # one member's gather payload; larger join requests are refused as malformed
MAX_GROUP_SIZE = 1024  # members of one group; a leader without target_group_size stops accepting at this size
MAX_GROUP_ID_BYTES = 64  # the original's leaders use 20 random bytes
MAX_REDIRECTS = 16  # GROUP_DISBANDED{suggested_leader} hops a follower follows in a row
MAX_DISBANDS_PER_LEADER = 2  # a leader that accepted us and then disbanded this often is not asked again (per search)
MAX_SILENCES_PER_LEADER = 2  # a leader that let this many of our requests time out unanswered is not asked again
# a leader starts a group with a follower only while at least this share of request_timeout is left of the follower's
# wait, for the group message to reach it
FOLLOWER_WAIT_MARGIN = 0.5

Code = averaging_pb2.MessageCode


def code_name(code: int) -> str:
    try:
        return Code.Name(code)
    except ValueError:
        return f"unknown code {code}"


def declared_expiration(scheduled_time: float, deadline: Optional[float], now: float, min_matchmaking_time: float):
    """When a search started at ``now`` ends: at the scheduled time, but not before ``min_matchmaking_time`` has
    passed, and never after the deadline."""
    expiration = max(scheduled_time, now + min_matchmaking_time)
    return expiration if deadline is None else min(expiration, deadline)


def may_start_early(group_size: int, expected_group_size: int, min_group_size: int, triggered: bool) -> bool:
    """Whether a leader may start its group of ``group_size`` members (itself included) before its declared time.

    It may when every peer it expects is already in the group (``expected_group_size`` comes from outside, e.g. the
    number of peers that train in this epoch; below 2: unknown, wait as usual), the group has at least
    ``min_group_size`` members, and this peer's own all-reduce may begin (``triggered``). Waiting longer would only
    delay the round, since nobody else is coming; waiting for the trigger leaves room to peers that show up while
    this one still computes. Followers see nothing new: a leader that reaches ``target_group_size`` also starts early.
    """
    return triggered and expected_group_size >= 2 and group_size >= max(expected_group_size, min_group_size)


def follower_wait_deadline(request_expiration: float, accepted_at: float, request_timeout: float) -> float:
    """Until when an accepted follower waits for the group: its declared expiration (never before the leader's), or
    the moment it was accepted if that came later, + request_timeout; then it closes its request and searches again.
    The follower's request_timeout is not on the wire: the leader's own stands in for it."""
    return max(request_expiration, accepted_at) + request_timeout


def follower_gave_up(wait_deadline: float, now: float, request_timeout: float) -> bool:
    """Whether a follower that waits until ``wait_deadline`` may have stopped waiting by the time a group message
    sent ``now`` reaches it (``FOLLOWER_WAIT_MARGIN`` of request_timeout is left for the message to arrive).

    A leader normally starts its group at its own expiration, well before that. One that was stalled (a loaded
    machine) past it may still list a follower whose closed request it has not read yet: a group started with it
    would run without it (the follower answers the leader's parts with BAD_GROUP_ID, or runs another group).
    """
    return now > wait_deadline - FOLLOWER_WAIT_MARGIN * request_timeout


def expected_group_size(step) -> int:
    """A step's hint of how many peers will average in its round (0: unknown; steps without the field give none)."""
    try:
        return max(0, int(getattr(step, "expected_group_size", 0) or 0))
    except (TypeError, ValueError):
        return 0


class PotentialLeaders:
    """Which declared peers this one may ask to lead its group, best first.

    Peers are ordered by ``(expiration, raw peer id)``; a peer only asks those that order before itself (the others
    will ask it), and asks each declaration (peer, expiration) at most once. A client-mode peer, which never
    declares, may ask anyone.
    """

    def __init__(self, peer_id: PeerID):
        self.peer_id = peer_id
        self._candidates: Dict[PeerID, DHTExpiration] = {}
        self._tried: Set[Tuple[PeerID, DHTExpiration]] = set()
        self.peers_seen: Set[PeerID] = set()  # every other peer ever seen looking for a group
        # leaders that accepted this peer and then went silent past their own deadline, or disbanded its group
        # MAX_DISBANDS_PER_LEADER times: never asked again in this search, whatever they declare next (a peer that
        # re-declares just ahead of everyone and never starts a group would otherwise cost everyone every round)
        self.unresponsive: Set[PeerID] = set()
        self._disbands: Counter = Counter()
        self._disbanded_too_often: Set[PeerID] = set()
        self._silences: Counter = Counter()

    def report_disband(self, leader: PeerID) -> None:
        """``leader`` accepted this peer and then disbanded the group without starting it."""
        self._disbands[leader] += 1
        if self._disbands[leader] >= MAX_DISBANDS_PER_LEADER:
            self._disbanded_too_often.add(leader)

    def report_silence(self, leader: PeerID) -> None:
        """``leader`` did not answer our join request at all within request_timeout (an honest one accepts or refuses
        at once). A peer that re-declares just ahead of everyone with a new expiration each time, and never answers,
        was asked again at every declaration and could keep a follower from ever asking the honest leader behind it.
        """
        self._silences[leader] += 1
        if self._silences[leader] >= MAX_SILENCES_PER_LEADER:
            self.unresponsive.add(leader)

    def is_excluded(self, peer: PeerID) -> bool:
        """Whether ``peer`` is not asked to lead again in this search (silent past its deadline, or disbanding)."""
        return peer in self.unresponsive or peer in self._disbanded_too_often

    def update(self, averagers: Iterable[Tuple[PeerID, DHTExpiration]]) -> None:
        """Replace the candidates with the latest active declarations read from the DHT."""
        self._candidates = {peer: expiration for peer, expiration in averagers if peer != self.peer_id}
        if self._disbands and not self.peers_seen.issuperset(self._candidates):
            # a peer never seen in this search: honest leaders that disbanded groups too small without it may fill
            # their groups now, so their disbands are forgotten (a fixed set of peers keeps them excluded)
            self._disbands.clear()
            self._disbanded_too_often.clear()
        self.peers_seen.update(self._candidates)
        current = set(self._candidates.items())
        self._tried &= current  # a declaration that is gone never comes back: forget it (bounded memory)

    def pop_next_leader(self, own_expiration: Optional[DHTExpiration], now: DHTExpiration) -> Optional[PeerID]:
        """The best untried candidate that orders before this peer (``own_expiration=None``: anyone), or None.

        The returned declaration counts as tried. Declarations that already expired are skipped.
        """
        own_key = (math.inf if own_expiration is None else own_expiration, self.peer_id.to_bytes())
        best = None
        for peer, expiration in self._candidates.items():
            key = (expiration, peer.to_bytes())
            if expiration < now or key >= own_key or (peer, expiration) in self._tried or self.is_excluded(peer):
                continue
            if best is None or key < best[0]:
                best = (key, peer)
        if best is None:
            return None
        (expiration, _), peer = best
        self._tried.add((peer, expiration))
        return peer


@dataclass
class LeaderState:
    """What a peer's checks of a join request look at (a snapshot taken under its lock)."""

    peer_id: PeerID
    looking_for_group: bool
    assembled: bool
    client_mode: bool
    schema_hash: bytes
    current_key: str
    declared_expiration: Optional[DHTExpiration]
    current_leader: Optional[PeerID]
    followers: Set[PeerID]
    target_group_size: Optional[int]
    gathered_items: int = 0  # items in the gathered objects of this peer and its followers (see payload.count_items)


def check_join_request(
    state: LeaderState, request: averaging_pb2.JoinRequest, requester: PeerID
) -> Optional[averaging_pb2.MessageFromLeader]:
    """The refusal to send to ``requester``, or None to accept it. The checks run in a fixed order, shared with the
    original implementation, and the first failing one decides the reply."""
    if not state.looking_for_group or state.assembled:
        return averaging_pb2.MessageFromLeader(code=Code.NOT_LOOKING_FOR_GROUP)
    malformed = (
        not request.schema_hash
        or not math.isfinite(request.expiration)
        or state.client_mode
        or not isinstance(request.group_key, str)
        or len(request.gather) > MAX_GATHER_BYTES
        or (items := gather_items(request.gather)) is None  # one bad payload would fail the whole group's round
    )
    if malformed:
        return averaging_pb2.MessageFromLeader(code=Code.PROTOCOL_VIOLATION)
    if request.schema_hash != state.schema_hash:
        return averaging_pb2.MessageFromLeader(code=Code.BAD_SCHEMA_HASH)
    if request.group_key != state.current_key:
        return averaging_pb2.MessageFromLeader(code=Code.BAD_GROUP_KEY)
    if state.declared_expiration is None:
        return averaging_pb2.MessageFromLeader(code=Code.NOT_DECLARED)
    if state.declared_expiration > request.expiration:
        return averaging_pb2.MessageFromLeader(code=Code.BAD_EXPIRATION_TIME)
    if state.current_leader is not None:
        return averaging_pb2.MessageFromLeader(
            code=Code.NOT_A_LEADER, suggested_leader=state.current_leader.to_bytes()
        )
    if requester == state.peer_id or requester in state.followers:
        return averaging_pb2.MessageFromLeader(code=Code.DUPLICATE_PEER_ID)
    group_size_limit = MAX_GROUP_SIZE if state.target_group_size is None else state.target_group_size
    if len(state.followers) + 1 >= group_size_limit:
        return averaging_pb2.MessageFromLeader(code=Code.GROUP_IS_FULL)
    if state.gathered_items + items > MAX_GROUP_GATHER_ITEMS:  # every member would refuse the group's gathered data
        return averaging_pb2.MessageFromLeader(code=Code.GROUP_IS_FULL)
    return None


def gather_items(payload: bytes) -> Optional[int]:
    """The items in a gather payload's user object (see payload.count_items), or None if the payload is malformed."""
    try:
        return decode_gather(payload).items
    except MalformedGatherError:
        return None


def parse_group(
    message: averaging_pb2.MessageFromLeader, own_peer_id: PeerID, leader: PeerID, own_gather: Optional[bytes] = None
) -> GroupInfo:
    """The group a BEGIN_ALLREDUCE message announces; ``ValueError`` saying what is wrong if it is malformed.

    :param own_gather: the gather payload this peer sent the leader, which must list it unchanged (if given)
    """
    peer_ids, gathered = list(message.ordered_peer_ids), list(message.gathered)
    if not 0 < len(message.group_id) <= MAX_GROUP_ID_BYTES:
        raise ValueError(f"group id of {len(message.group_id)} bytes (expected 1 to {MAX_GROUP_ID_BYTES})")
    if not 0 < len(peer_ids) <= MAX_GROUP_SIZE:
        raise ValueError(f"group of {len(peer_ids)} peers (expected 1 to {MAX_GROUP_SIZE})")
    if len(gathered) != len(peer_ids):
        raise ValueError(f"{len(gathered)} gathered payloads for {len(peer_ids)} peers")
    if any(not 0 < len(peer) <= MAX_PEER_ID_BYTES for peer in peer_ids) or len(set(peer_ids)) != len(peer_ids):
        raise ValueError("empty, oversized or repeated peer ids in the group")
    if any(len(item) > MAX_GATHER_BYTES for item in gathered):
        raise ValueError(f"a gathered payload exceeds {MAX_GATHER_BYTES} bytes")
    members = tuple(PeerID(peer) for peer in peer_ids)
    if own_peer_id not in members or leader not in members:
        raise ValueError("the group does not contain this peer and its leader")
    if own_gather is not None and gathered[members.index(own_peer_id)] != own_gather:
        # (e.g. it lists this peer as auxiliary or client-mode, or with another bandwidth, than it declared)
        raise ValueError("the leader changed the gathered data of this peer (its mode, bandwidth or user object)")
    return GroupInfo(group_id=message.group_id, peer_ids=members, gathered=tuple(gathered))


@dataclass
class SearchReport:
    """What happened during one search for a group, to explain a failure."""

    group_key: str
    min_group_size: int
    client_mode: bool
    dht_lookups: int = 0
    failed_lookups: int = 0  # of those, the ones that failed or ran out of time
    failed_declarations: int = 0  # stores of this peer's declaration that failed or ran out of time
    largest_group: int = 1  # followers + 1 at the best moment (leader side)
    too_small_disbands: int = 0
    replies: Counter = field(default_factory=Counter)  # codes received from would-be leaders
    refusals: Counter = field(default_factory=Counter)  # codes this peer sent to would-be followers
    bad_schema_peers: Set[PeerID] = field(default_factory=set)
    leader_timeouts: int = 0
    failed_requests: int = 0
    last_error: str = ""
    disbanded_by_leader: int = 0

    def add_error(self, description: str) -> None:
        self.failed_requests += 1
        self.last_error = description

    def explain(self, peers_seen: Set[PeerID]) -> str:
        """One message with the likely reason first, then the counts that support it."""
        reasons = []
        accepted_anywhere = self.replies[Code.ACCEPTED] > 0 or self.largest_group > 1
        if not peers_seen and self.dht_lookups == 0:
            reasons.append("the deadline passed before this peer could look for others under " + self.group_key)
        elif not peers_seen and self.failed_lookups >= self.dht_lookups:
            reasons.append(
                f"this peer could not read the averagers under {self.group_key}: all {self.dht_lookups} of its DHT "
                "lookups failed or ran out of time (a slow or unreachable DHT: check its initial peers and load)"
            )
        elif not peers_seen:
            reasons.append(
                f"no other averagers were found under the key {self.group_key} ({self.dht_lookups} DHT lookups): "
                "check that the other peers use the same prefix and group bits and that this DHT reaches them"
            )
        elif self.bad_schema_peers and not accepted_anywhere:
            reasons.append(
                f"the schema hash differs from the peers seen: {len(self.bad_schema_peers)} of {len(peers_seen)} "
                f"peers under {self.group_key} average tensors of other shapes, dtypes or compression "
                f"({self.replies[Code.BAD_SCHEMA_HASH]} BAD_SCHEMA_HASH replies received, "
                f"{self.refusals[Code.BAD_SCHEMA_HASH]} sent)"
            )
        elif self.client_mode:
            reasons.append(
                f"none of the {len(peers_seen)} peers seen under {self.group_key} accepted this client-mode peer "
                "(client-mode peers can only join groups led by others)"
            )
        else:
            reasons.append(
                f"the group was too small at the deadline: at most {self.largest_group} of min_group_size="
                f"{self.min_group_size} peers gathered, {len(peers_seen)} other peers seen under {self.group_key}"
            )
        if self.failed_lookups and self.failed_lookups < self.dht_lookups:
            reasons.append(f"{self.failed_lookups} of {self.dht_lookups} DHT lookups failed or ran out of time")
        if self.failed_declarations:
            reasons.append(
                f"{self.failed_declarations} store(s) of this peer's declaration failed or ran out of time (others "
                "may not have seen it)"
            )
        if self.leader_timeouts:
            reasons.append(f"timed out waiting for the leader {self.leader_timeouts} time(s)")
        if self.disbanded_by_leader:
            reasons.append(f"{self.disbanded_by_leader} leader(s) disbanded the group")
        if self.too_small_disbands:
            reasons.append(f"disbanded {self.too_small_disbands} group(s) of this peer that were too small")
        other_replies = {code: n for code, n in self.replies.items() if code not in (Code.ACCEPTED,)}
        if other_replies:
            reasons.append("replies from would-be leaders: " + _format_codes(other_replies))
        if self.failed_requests:
            reasons.append(f"{self.failed_requests} failed request(s), last: {self.last_error}")
        return "; ".join(reasons)


def _format_codes(counts: Dict[int, int]) -> str:
    return ", ".join(f"{code_name(code)} x{n}" for code, n in sorted(counts.items()))
