"""The leader's side of matchmaking: answer join requests (``rpc_join_group``), gather followers, and start the
group (at ``target_group_size``, once every expected peer joined, or when the declared time runs out) or disband it.
A leader that was stalled past a follower's wait leaves that follower out of the group (it may have searched again).

``GroupLeading`` is mixed into ``Matchmaking``, which owns the state it reads: the lock, the step being matched, the
followers, the declared expiration and the current leader of this peer.
"""

import asyncio
import os
import random
from dataclasses import dataclass
from typing import AsyncIterator, Optional

from hivemind.averaging.group_info import GroupInfo
from hivemind.averaging.matchmaking_rules import (
    Code,
    LeaderState,
    check_join_request,
    code_name,
    expected_group_size,
    follower_gave_up,
    follower_wait_deadline,
    gather_items,
    may_start_early,
)
from hivemind.p2p import P2PContext, PeerID
from hivemind.proto import averaging_pb2
from hivemind.utils.asyncio import await_with_timeout
from hivemind.utils.logging import get_logger
from hivemind.utils.timed_storage import get_dht_time

logger = get_logger(__name__)

__all__ = ["GroupLeading", "Follower", "EARLY_START_POLL_PERIOD"]

GROUP_ID_BYTES = 20
EARLY_START_POLL_PERIOD = 0.05  # seconds: a leader with every expected peer checks this often whether it may start


@dataclass
class Follower:
    """A peer that this one accepted to lead, waiting for the outcome of its join request."""

    request: averaging_pb2.JoinRequest
    outcome: "asyncio.Future[averaging_pb2.MessageFromLeader]"  # BEGIN_ALLREDUCE or GROUP_DISBANDED
    waits_until: float  # (DHT time) when it stops waiting for our group, as far as this peer can tell
    gather_items: int = 0  # items in its gathered object (they count towards the group's MAX_GROUP_GATHER_ITEMS)


class GroupLeading:
    """Leader-side methods of ``Matchmaking`` (see there for the attributes they use)."""

    async def _maybe_start_early(self, step) -> Optional[GroupInfo]:
        """Start our group before the declared time if every expected peer has joined and our round may begin."""
        if self._followers and self._early_start_allowed(step):
            async with self._lock:
                self._leave_out_late_followers()
                if not self._assembled.done() and self._current_leader is None and self._early_start_allowed(step):
                    return self._assemble_group()
        return None

    def _early_start_allowed(self, step) -> bool:
        triggered = bool(getattr(step, "triggered", True))  # a step without a trigger may begin at once
        return may_start_early(len(self._followers) + 1, expected_group_size(step), self.min_group_size, triggered)

    async def rpc_join_group(
        self, request: averaging_pb2.JoinRequest, context: P2PContext
    ) -> AsyncIterator[averaging_pb2.MessageFromLeader]:
        """A peer asks this one to lead it: refuse, or accept and later send the group (or a disband notice)."""
        requester = context.remote_id
        follower = None
        try:
            try:
                refusal, follower, patience = await self._admit(request, requester)
            except Exception as e:
                logger.warning(f"{self.peer_id} failed to process a join request from {requester}: {e!r}")
                refusal = averaging_pb2.MessageFromLeader(code=Code.INTERNAL_ERROR)
            if refusal is not None:
                logger.debug(f"{self.peer_id} refused to lead {requester}: {code_name(refusal.code)}")
                yield refusal
                return
            yield averaging_pb2.MessageFromLeader(code=Code.ACCEPTED)
            try:
                outcome = await await_with_timeout(asyncio.shield(follower.outcome), patience)
            except asyncio.TimeoutError:
                # the group may have started just now (a stalled loop wakes the search and this timeout together):
                # send it then; otherwise drop the follower at once, not after the yield below, which a group could
                # start during, listing a follower told GROUP_DISBANDED
                if not follower.outcome.done():
                    follower.outcome.set_result(averaging_pb2.MessageFromLeader(code=Code.GROUP_DISBANDED))
                    if self._followers.get(requester) is follower:
                        del self._followers[requester]
                outcome = follower.outcome.result()
            yield outcome
        finally:
            if follower is not None and self._followers.get(requester) is follower:
                del self._followers[requester]  # the follower left (or gave up) before the group started

    async def _admit(self, request: averaging_pb2.JoinRequest, requester: PeerID):
        """Check a join request under the lock: ``(refusal, None, None)`` or ``(None, follower, patience)``."""
        # while this peer waits for another leader's first reply it holds the lock for up to request_timeout, which is
        # as long as the requester waits for ours: it is refused within half of that instead (as a peer that follows
        # someone is), so that it does not give up on us (counting us silent) or, accepted just as it gave up, leave
        # a group that starts without it
        try:
            await await_with_timeout(self._lock.acquire(), self.request_timeout / 2)
        except asyncio.TimeoutError:
            self._report.refusals[Code.NOT_A_LEADER] += 1
            return averaging_pb2.MessageFromLeader(code=Code.NOT_A_LEADER), None, None
        try:
            refusal = check_join_request(self._leader_state(), request, requester)
            if refusal is not None:
                self._report.refusals[refusal.code] += 1
                if refusal.code == Code.BAD_SCHEMA_HASH:
                    self._leaders.peers_seen.add(requester)
                    self._report.bad_schema_peers.add(requester)
                return refusal, None, None
            self._leave_out_late_followers()  # (before they count towards a group that starts now)
            now = get_dht_time()
            waits_until = follower_wait_deadline(request.expiration, now, self.request_timeout)
            outcome = asyncio.get_running_loop().create_future()
            follower = Follower(request, outcome, waits_until, gather_items(request.gather) or 0)
            self._followers[requester] = follower
            self._report.largest_group = max(self._report.largest_group, len(self._followers) + 1)
            # a follower waits for our group until its own expiration (not before ours) + request_timeout
            patience = max(0.0, self._declared_expiration - now) + 3 * self.request_timeout
            if self.target_group_size is not None and len(self._followers) + 1 >= self.target_group_size:
                self._assemble_group()
            elif self._current_leader is None and self._early_start_allowed(self._step):
                self._assemble_group()
            return None, follower, patience
        finally:
            self._lock.release()

    def _leader_state(self) -> LeaderState:
        return LeaderState(
            peer_id=self.peer_id,
            looking_for_group=self._step is not None,
            assembled=self._assembled is not None and self._assembled.done(),
            client_mode=self.client_mode,
            schema_hash=self.schema_hash,
            current_key=self.group_key_manager.current_key,
            declared_expiration=self._declared_expiration,
            current_leader=self._current_leader,
            followers=set(self._followers),
            target_group_size=self.target_group_size,
            gathered_items=self._own_gather_items + sum(f.gather_items for f in self._followers.values()),
        )

    def _assemble_group(self) -> GroupInfo:
        """Start the group of this leader and its followers (call with ``self._lock`` held)."""
        members = [(self.peer_id, self._step.data_for_gather)]
        members += [(peer, follower.request.gather) for peer, follower in self._followers.items()]
        random.shuffle(members)
        group = GroupInfo(
            group_id=os.urandom(GROUP_ID_BYTES),
            peer_ids=tuple(peer for peer, _ in members),
            gathered=tuple(gathered for _, gathered in members),
        )
        message = averaging_pb2.MessageFromLeader(
            code=Code.BEGIN_ALLREDUCE,
            group_id=group.group_id,
            ordered_peer_ids=[peer.to_bytes() for peer in group.peer_ids],
            gathered=group.gathered,
        )
        for follower in self._followers.values():
            if not follower.outcome.done():
                follower.outcome.set_result(message)
        self._followers.clear()
        self._assembled.set_result(group)
        logger.info(f"Formed a group of {group.group_size} peers led by this peer ({self.peer_id})")
        return group

    def _leave_out_late_followers(self) -> None:
        """Tell the followers that may have stopped waiting for our group (this peer was stalled past their wait, and
        has not read their closed requests yet) that it will not include them (call with ``self._lock`` held): a
        group started with them would list members that do not run it."""
        now = get_dht_time()
        for peer, follower in list(self._followers.items()):
            if follower_gave_up(follower.waits_until, now, self.request_timeout):
                del self._followers[peer]
                if not follower.outcome.done():
                    follower.outcome.set_result(averaging_pb2.MessageFromLeader(code=Code.GROUP_DISBANDED))
                left = follower.waits_until - now
                waited = f"stopped waiting for it {-left:.2f} s ago" if left <= 0 else f"stops waiting in {left:.2f} s"
                late = now - self._declared_expiration if self._declared_expiration is not None else float("nan")
                logger.warning(
                    f"{self.peer_id} leaves {peer} out of its group: this peer is {late:.2f} s past its declared "
                    f"time (its event loop was stalled: an overloaded machine?) and that follower {waited}, too soon "
                    f"for the group to reach it; it is told GROUP_DISBANDED and searches again"
                )

    def _disband_followers(self, suggested_leader: Optional[PeerID]) -> None:
        """Tell every follower that this group will not start (call with ``self._lock`` held)."""
        message = averaging_pb2.MessageFromLeader(code=Code.GROUP_DISBANDED)
        if suggested_leader is not None:
            message.suggested_leader = suggested_leader.to_bytes()
        for follower in self._followers.values():
            if not follower.outcome.done():
                follower.outcome.set_result(message)
        self._followers.clear()
