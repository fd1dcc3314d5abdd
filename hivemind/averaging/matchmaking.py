"""Matchmaking: peers that declared themselves under one DHT group key elect a leader, which assembles a group.

Each searching peer declares ``(group key, own peer id) -> True`` until an expiration time T. Peers order each other
by ``(T, peer id)``; a peer asks the best-ordered peers before itself to lead it (``rpc_join_group``), and leads
those that ask it. A leader starts the group as soon as it reaches ``target_group_size`` (or, once triggered, has
every peer that its step expects), or at its T if it has at least ``min_group_size`` members; otherwise it disbands
the group and searches again. The leader's side lives in ``matchmaking_leader``.
"""

import asyncio
import math
from typing import Dict, Optional, Type

from hivemind.averaging.group_info import GroupInfo
from hivemind.averaging.key_manager import MAX_PEER_ID_BYTES, GroupKeyManager
from hivemind.averaging.matchmaking_leader import EARLY_START_POLL_PERIOD, Follower, GroupLeading
from hivemind.averaging.matchmaking_rules import (
    FOLLOWER_WAIT_MARGIN,
    MAX_GATHER_BYTES,
    MAX_REDIRECTS,
    Code,
    PotentialLeaders,
    SearchReport,
    code_name,
    declared_expiration,
    expected_group_size,
    gather_items,
    parse_group,
)
from hivemind.dht import DHT
from hivemind.p2p import P2P, PeerID, ServicerBase
from hivemind.proto import averaging_pb2
from hivemind.utils.asyncio import await_with_timeout, cancel_and_wait
from hivemind.utils.logging import get_logger
from hivemind.utils.timed_storage import get_dht_time

logger = get_logger(__name__)

__all__ = ["Matchmaking", "MatchmakingException", "PotentialLeaders"]

MIN_POLL_PERIOD, MAX_POLL_PERIOD = 0.1, 1.0  # seconds between DHT lookups of the group key while searching
MIN_DHT_CALL_TIMEOUT = 5.0  # a DHT get/store of the group key waits at most max(this, request_timeout)
# a search without a deadline (step() with no timeout) says that it is still looking after this long, then this often
STILL_LOOKING_AFTER, STILL_LOOKING_PERIOD = 15.0, 60.0


class MatchmakingException(Exception):
    """No group was found; the message says why (no peers, too few, other schema, unresponsive leaders, ...)."""


class GroupDue(Exception):
    """A DHT call of a leader was cut short: its declared time passed while it had followers, so their group is due."""


class Matchmaking(GroupLeading):
    """Finds a group for one averaging round at a time (``look_for_group``) and answers other peers' join requests
    (``rpc_join_group``, served by the averager under its prefix).

    :param p2p: this peer's P2P (its peer id is the one declared)
    :param schema_hash: peers join only if their tensors' schema hashes are equal
    :param dht: the DHT holding the group keys
    :param servicer_type: the averager class whose ``rpc_join_group`` handlers the peers serve
    :param prefix: averaging namespace (group keys and handler namespace), without dots
    :param target_group_size: start a group as soon as it has this many peers (None: no upper bound)
    :param min_group_size: the smallest group a leader starts when its time runs out
    :param min_matchmaking_time: seconds to gather peers before a declared search ends
    :param request_timeout: seconds to wait for a leader's first reply (and for its last one after the search ends)
    :param client_mode: a client-mode peer never declares itself and never leads; it only joins others
    :param initial_group_bits: 0/1 string appended to the group key
    """

    def __init__(
        self,
        p2p: P2P,
        schema_hash: bytes,  # peers with another hash (other tensor shapes or dtypes) are refused
        dht: DHT,
        *,
        servicer_type: Type[ServicerBase],
        prefix: str,
        target_group_size: Optional[int] = None,
        min_group_size: int = 2,
        min_matchmaking_time: float = 5.0,
        request_timeout: float = 3.0,
        client_mode: bool = False,
        initial_group_bits: str = "",
    ):
        if target_group_size is not None and target_group_size < 1:
            raise ValueError(f"target_group_size must be None or at least 1, got {target_group_size}")
        if min_group_size < 1 or (target_group_size is not None and min_group_size > target_group_size):
            raise ValueError(f"min_group_size must be in [1, target_group_size], got {min_group_size}")
        if not (math.isfinite(request_timeout) and request_timeout > 0) or not min_matchmaking_time >= 0:
            raise ValueError(
                f"request_timeout must be positive and min_matchmaking_time non-negative, got {request_timeout} "
                f"and {min_matchmaking_time}"
            )
        if request_timeout >= min_matchmaking_time:
            logger.warning(
                f"request_timeout ({request_timeout} s) should be smaller than min_matchmaking_time "
                f"({min_matchmaking_time} s), or followers may give up on their leader before it starts the group: "
                f"raise min_matchmaking_time (hivemind.Optimizer: matchmaking_time) or lower request_timeout "
                f"(hivemind.Optimizer: averager_opts=dict(request_timeout=...))"
            )
        self.p2p, self.schema_hash, self.dht = p2p, schema_hash, dht
        self.peer_id: PeerID = p2p.peer_id
        self.servicer_type, self.prefix, self.client_mode = servicer_type, prefix, client_mode
        self.target_group_size = target_group_size
        self.min_group_size = min_group_size
        self.min_matchmaking_time = min_matchmaking_time
        self.request_timeout = request_timeout
        self.group_key_manager = GroupKeyManager(
            dht, prefix, initial_group_bits, target_group_size, peer_id=self.peer_id
        )
        self.poll_period = min(max(min(min_matchmaking_time, request_timeout) / 4, MIN_POLL_PERIOD), MAX_POLL_PERIOD)
        self.dht_call_timeout = max(request_timeout, MIN_DHT_CALL_TIMEOUT)

        self._search_lock = asyncio.Lock()  # one search at a time
        self._lock = asyncio.Lock()  # guards the state below against join requests arriving meanwhile
        self._step = None  # the step being matched; None when not looking for a group
        self._own_gather_items = 0  # items in the step's gathered object (see payload.count_items)
        self._assembled: Optional[asyncio.Future] = None  # resolved with the GroupInfo this peer leads
        self._declared_key: Optional[str] = None
        self._declared_expiration: Optional[float] = None
        self._declared_for_scheduled_time: Optional[float] = None
        self._current_leader: Optional[PeerID] = None
        self._followers: Dict[PeerID, Follower] = {}
        self._disbanded_by: Optional[PeerID] = None
        self._leaders = PotentialLeaders(self.peer_id)
        self._report = SearchReport(self.group_key_manager.current_key, min_group_size, client_mode)

    @property
    def is_looking_for_group(self) -> bool:
        return self._step is not None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.peer_id}, key={self.group_key_manager.current_key})"

    # ------------------------------------------------------------------ searching (this peer's side)

    async def look_for_group(self, step) -> Optional[GroupInfo]:
        """Find a group for ``step`` and return it; raise ``MatchmakingException`` saying why if none was found.

        ``step`` provides ``scheduled_time`` (may change meanwhile), ``deadline`` (absolute DHT time or None: search
        until a group forms) and ``data_for_gather`` (the bytes sent to the other members).
        """
        if not isinstance(step.data_for_gather, bytes) or len(step.data_for_gather) > MAX_GATHER_BYTES:
            raise ValueError(f"the gather payload must be bytes of at most {MAX_GATHER_BYTES} bytes")
        own_gather_items = gather_items(step.data_for_gather) or 0
        async with self._search_lock:
            async with self._lock:
                self._own_gather_items = own_gather_items
                self._assembled = asyncio.get_running_loop().create_future()
                self._leaders = PotentialLeaders(self.peer_id)
                key = self.group_key_manager.current_key
                self._report = SearchReport(key, self.min_group_size, self.client_mode)
                self._step = step
            search = asyncio.create_task(self._search(step))
            try:
                hard_timeout = None
                if step.deadline is not None:  # every wait inside is bounded; this only guards against a bug
                    hard_timeout = max(0.0, step.deadline - get_dht_time()) + 2 * self.request_timeout + 1
                waiting = asyncio.wait({self._assembled, search}, return_when=asyncio.FIRST_COMPLETED)
                await await_with_timeout(waiting, hard_timeout)
                if self._assembled.done():
                    return self._assembled.result()
                return search.result()
            except asyncio.TimeoutError:
                raise MatchmakingException(
                    f"Could not find a group: matchmaking overran its deadline; {self._explain()}"
                ) from None
            finally:
                if not search.done():
                    await _cancel_quietly(search)
                elif not search.cancelled() and search.exception() is not None and self._assembled.done():
                    logger.debug(f"Search ended with {search.exception()!r} after the group was assembled")
                await self._end_search()

    def _explain(self) -> str:
        return self._report.explain(self._leaders.peers_seen)

    async def _end_search(self) -> None:
        async with self._lock:
            self._step = None
            if not self._assembled.done():
                self._assembled.cancel()
            self._disband_followers(suggested_leader=None)
            self._current_leader = None
            declared_key, declared_expiration = self._declared_key, self._declared_expiration
            self._declared_key = self._declared_expiration = self._declared_for_scheduled_time = None
        if declared_key is not None and declared_expiration is not None:  # (None: it expired, nothing to withdraw)
            await self._withdraw(declared_key, declared_expiration)

    async def _search(self, step) -> GroupInfo:
        # poll soon after (re-)declaring, when the others are declaring too, then back off to the regular period
        next_poll, poll_delay = -math.inf, MIN_POLL_PERIOD
        started = get_dht_time()
        still_looking_at = started + STILL_LOOKING_AFTER
        while True:
            now = get_dht_time()
            if not self.client_mode:  # (before the deadline: a declaration may end at it, with a group to start)
                group = await self._maybe_start_early(step)
                if group is not None:
                    return group
                if self._declared_expiration is not None and now >= self._declared_expiration:
                    group = await self._on_declaration_expired()
                    if group is not None:
                        return group
                    continue  # re-declare with a new expiration (or stop at the deadline)

            if step.deadline is not None and now >= step.deadline:
                raise MatchmakingException(f"Could not find a group before the deadline: {self._explain()}")
            if step.deadline is None and now >= still_looking_at:  # (with a deadline, its error says all this)
                logger.info(f"Still looking for a group after {now - started:.0f} s (no timeout): {self._explain()}")
                still_looking_at = now + STILL_LOOKING_PERIOD

            if not self.client_mode:
                if self._needs_declaration(step):
                    await self._declare(step)
                    next_poll, poll_delay = -math.inf, MIN_POLL_PERIOD

            # (the lookups only find leaders to ask: none while our own group is due too soon, see _may_ask_others)
            if get_dht_time() >= next_poll and self._may_ask_others():
                next_poll = get_dht_time() + poll_delay
                poll_delay = min(2 * poll_delay, self.poll_period)
                await self._poll_dht()

            if self._may_ask_others():
                leader = self._leaders.pop_next_leader(self._declared_expiration, get_dht_time())
                if leader is not None:
                    group = await self._request_join_group(leader, step)
                    if group is not None:
                        return group
                    continue

            wake_up = next_poll if self._may_ask_others() else math.inf
            if self._declared_expiration is not None:
                wake_up = min(wake_up, self._declared_expiration)
            if step.deadline is not None:
                wake_up = min(wake_up, step.deadline)
            if self._followers and 2 <= expected_group_size(step) <= len(self._followers) + 1:
                wake_up = min(wake_up, get_dht_time() + EARLY_START_POLL_PERIOD)  # all here: start once it is due
            await asyncio.sleep(max(0.0, wake_up - get_dht_time()))

    def _may_ask_others(self) -> bool:
        """Whether to ask a better-ordered peer to lead: not when this peer's own group is due before the reply."""
        if not self._followers or self._declared_expiration is None:
            return True
        return self._declared_expiration - get_dht_time() > self.request_timeout

    def _needs_declaration(self, step) -> bool:
        if self._declared_expiration is None or self._declared_key != self.group_key_manager.current_key:
            return True
        if step.scheduled_time != self._declared_for_scheduled_time:
            # the user moved the scheduled time: follow it unless that would outlast our followers' patience
            new_expiration = self._expiration_for(step)
            return new_expiration != self._declared_expiration and (
                not self._followers or new_expiration < self._declared_expiration
            )
        return False

    def _expiration_for(self, step) -> float:
        return declared_expiration(step.scheduled_time, step.deadline, get_dht_time(), self.min_matchmaking_time)

    async def _declare(self, step) -> None:
        previous_key, previous_expiration = self._declared_key, self._declared_expiration
        async with self._lock:
            key, expiration = self.group_key_manager.current_key, self._expiration_for(step)
            self._declared_key, self._declared_expiration = key, expiration
            self._declared_for_scheduled_time = step.scheduled_time
            self._report.group_key = key
        if previous_key is not None and previous_key != key:
            await self._withdraw(previous_key, previous_expiration)
        logger.debug(f"{self.peer_id} looks for a group under {key} until {expiration:.3f}")
        try:
            stored = await self._dht_call(self.group_key_manager.declare_averager(key, self.peer_id, expiration))
            if not stored:
                self._report.failed_declarations += 1
                logger.debug(f"{self.peer_id} could not store its declaration under {key}")
        except GroupDue:
            logger.debug(f"{self.peer_id} cut its declaration under {key} short: the group of its followers is due")
        except Exception as e:
            self._report.failed_declarations += 1
            # (cut at the step's deadline: the step's own error says why it found no group)
            at_deadline = step.deadline is not None and get_dht_time() >= step.deadline
            log = logger.debug if at_deadline else logger.warning
            log(f"{self.peer_id} failed to declare itself under {key}: {e!r}")

    async def _withdraw(self, key: str, expiration: float) -> None:
        try:
            await await_with_timeout(
                self.group_key_manager.declare_averager(key, self.peer_id, expiration, looking_for_group=False),
                self.dht_call_timeout,
            )
        except Exception as e:
            logger.debug(f"{self.peer_id} failed to withdraw its declaration under {key}: {e!r}")

    async def _poll_dht(self) -> None:
        key = self.group_key_manager.current_key
        self._report.dht_lookups += 1
        try:
            averagers = await self._dht_call(self.group_key_manager.get_averagers(key, only_active=True))
        except GroupDue:
            return  # (cut short on purpose, not a failure)
        except Exception as e:
            self._report.failed_lookups += 1
            logger.debug(f"{self.peer_id} failed to read the averagers under {key}: {e!r}")
            return
        self._leaders.update(averagers)

    async def _dht_call(self, coroutine):
        """The result of a DHT call (a lookup or a store of our declaration) within dht_call_timeout and before the
        step's deadline (past it, the search ends anyway, with its reasons), cut short (``GroupDue``) once our declared
        time has passed while we have followers, whenever they joined: a slow call (a loaded DHT) must not hold up the
        start of their group, which they wait for only until their own expiration + request_timeout."""
        call = asyncio.ensure_future(coroutine)
        give_up = get_dht_time() + self.dht_call_timeout
        deadline = getattr(self._step, "deadline", None)
        if deadline is not None:
            give_up = min(give_up, deadline)
        check_period = max(0.05, self.request_timeout / 4)  # (after our time: how soon a late follower is noticed)
        try:
            while not call.done():
                now, expiration = get_dht_time(), self._declared_expiration
                if expiration is not None and now >= expiration and self._followers:
                    raise GroupDue("the group of this peer's followers is due")
                if now >= give_up:
                    raise asyncio.TimeoutError(f"no answer within {self.dht_call_timeout} s or by the step's deadline")
                if expiration is None:
                    wake_up = give_up
                else:  # (at our time, then every check_period while we have no followers)
                    wake_up = min(give_up, expiration if now < expiration else now + check_period)
                await asyncio.wait({call}, timeout=max(0.0, wake_up - now))
            return call.result()
        finally:
            if not call.done():
                await cancel_and_wait(call)

    async def _on_declaration_expired(self) -> Optional[GroupInfo]:
        """Our declared time is up: start the group if it is large enough, else disband it."""
        async with self._lock:
            if self._assembled.done():
                return self._assembled.result()
            self._leave_out_late_followers()
            if self._followers and len(self._followers) + 1 >= self.min_group_size:
                return self._assemble_group()
            if self._followers:
                self._report.too_small_disbands += 1
                logger.debug(
                    f"{self.peer_id} disbands its group of {len(self._followers) + 1}: fewer than "
                    f"min_group_size={self.min_group_size} when its time ran out"
                )
                self._disband_followers(suggested_leader=None)
            elif self.min_group_size <= 1:
                return self._assemble_group()
            self._declared_expiration = None  # re-declared by the search loop
        return None

    async def _request_join_group(self, leader: PeerID, step) -> Optional[GroupInfo]:
        """Ask ``leader`` to lead us; follow its redirections. Returns the group, or None to keep searching."""
        visited, disbanded_us = set(), []
        group = None
        for _ in range(MAX_REDIRECTS):
            visited.add(leader)
            group, suggested_leader = await self._request_one_leader(leader, step)
            if self._disbanded_by is not None:
                disbanded_us.append(self._disbanded_by)
            if group is not None or suggested_leader is None or suggested_leader == self.peer_id:
                break
            if suggested_leader in visited or self._leaders.is_excluded(suggested_leader):
                break  # a loop of suggestions, or a leader that wasted our time before
            if step.deadline is not None and get_dht_time() >= step.deadline:
                break
            logger.debug(f"{self.peer_id}: {leader} disbanded its group and suggested {suggested_leader}")
            leader = suggested_leader
        if group is None:  # leaders that accepted us, then disbanded, and we found no group through them
            for disbanding_leader in disbanded_us:
                self._leaders.report_disband(disbanding_leader)
        return group

    async def _request_one_leader(self, leader: PeerID, step):
        """One join request: ``(group, None)``, ``(None, suggested leader)`` or ``(None, None)``."""
        stream, accepted = None, False
        self._disbanded_by = None  # set if this leader accepted us and then disbanded its group
        try:
            async with self._lock:
                if self._assembled.done():  # someone made our own group full meanwhile
                    return None, None
                expiration = self._declared_expiration
                if expiration is None:
                    expiration = self._expiration_for(step)
                our_key = self.group_key_manager.current_key
                request = averaging_pb2.JoinRequest(
                    schema_hash=self.schema_hash,
                    expiration=expiration,
                    gather=step.data_for_gather,
                    client_mode=self.client_mode,
                    group_key=our_key,
                )
                stub = self.servicer_type.get_stub(self.p2p, leader, namespace=self.prefix)
                stream = await stub.rpc_join_group(request)
                message = await await_with_timeout(stream.__anext__(), self.request_timeout)
                if message.code == Code.ACCEPTED:
                    self._current_leader = leader
                    self._disband_followers(suggested_leader=leader)
            self._report.replies[message.code] += 1
            if message.code != Code.ACCEPTED:
                if message.code == Code.BAD_SCHEMA_HASH:
                    self._report.bad_schema_peers.add(leader)
                logger.debug(f"{self.peer_id}: {leader} refused to lead us: {code_name(message.code)}")
                return None, None

            logger.debug(f"{self.peer_id} joined the group of {leader}, waiting for it to start")
            accepted = True
            time_left = max(0.0, expiration - get_dht_time())
            message = await _next_with_grace(
                stream, time_left + self.request_timeout, grace=FOLLOWER_WAIT_MARGIN * self.request_timeout
            )
            if message.code == Code.BEGIN_ALLREDUCE:
                try:
                    group = parse_group(message, self.peer_id, leader, own_gather=step.data_for_gather)
                except ValueError as e:
                    logger.warning(f"{self.peer_id}: leader {leader} sent a malformed group ({e}), ignoring it")
                    self._report.add_error(f"malformed group from {leader}: {e}")
                    return None, None
                # a member now: no followers of our own until the search ends (once _current_leader is reset below,
                # one could be admitted and get a group whose all-reduce this peer never runs)
                async with self._lock:
                    if not self._assembled.done():
                        self._assembled.set_result(group)
                logger.info(f"Joined a group of {group.group_size} peers led by {leader} (this peer: {self.peer_id})")
                return group, None
            if message.code == Code.GROUP_DISBANDED:
                self._report.disbanded_by_leader += 1
                self._disbanded_by = leader
                if 0 < len(message.suggested_leader) <= MAX_PEER_ID_BYTES:
                    return None, PeerID(message.suggested_leader)
                return None, None
            self._report.replies[message.code] += 1
            logger.debug(f"{self.peer_id}: leader {leader} ended our request with {code_name(message.code)}")
            return None, None
        except asyncio.TimeoutError:
            self._report.leader_timeouts += 1
            logger.debug(f"{self.peer_id}: leader {leader} did not reply in time")
            if accepted:  # an honest leader starts or disbands its group by its declared time, before ours
                self._leaders.unresponsive.add(leader)
            else:
                self._leaders.report_silence(leader)
            return None, None
        except StopAsyncIteration:
            self._report.add_error(f"{leader} closed the stream without a reply")
            return None, None
        except Exception as e:
            self._report.add_error(f"{leader}: {e!r}")
            logger.debug(f"{self.peer_id}: request to {leader} failed: {e!r}")
            return None, None
        finally:
            self._current_leader = None
            if stream is not None:
                await stream.aclose()


async def _next_with_grace(stream, timeout: float, grace: float):
    """The next message of ``stream`` within ``timeout`` s, or else within ``grace`` s more, counted from when the
    first timeout was handled; ``asyncio.TimeoutError`` if none came.

    A process stalled past ``timeout`` (a loaded machine) handles its timeout in the same loop iteration as the data
    that arrived meanwhile, before reading it: without the grace, a follower gave up on a group that its leader had
    sent in time (and that lists it), sitting unread in its socket.
    """
    receiving = asyncio.ensure_future(stream.__anext__())
    try:
        done, _ = await asyncio.wait({receiving}, timeout=timeout)
        if not done:
            done, _ = await asyncio.wait({receiving}, timeout=grace)
        if not done:
            raise asyncio.TimeoutError(f"no message within {timeout} s + {grace} s")
        return receiving.result()
    finally:
        if not receiving.done():
            await _cancel_quietly(receiving)


async def _cancel_quietly(task: asyncio.Task) -> None:
    try:
        await cancel_and_wait(task)
    except Exception as e:
        logger.debug(f"Matchmaking search ended with {e!r} while being cancelled")
