"""Set-up shared by the matchmaking tests: averaging peers made of a real DHT process, a P2P bound to its daemon in
the test process, a Matchmaking and a small servicer that serves its ``rpc_join_group``."""

import asyncio
import contextlib
import os
from dataclasses import dataclass, field
from typing import AsyncIterator, List, Optional, Tuple

from hivemind.averaging.group_info import GroupInfo
from hivemind.averaging.matchmaking import Matchmaking, MatchmakingException
from hivemind.dht import DHT
from hivemind.p2p import P2P, P2PContext, PeerID, ServicerBase
from hivemind.proto import averaging_pb2
from hivemind.utils.serializer import MSGPackSerializer
from hivemind.utils.timed_storage import get_dht_time

LOCALHOST = ["/ip4/127.0.0.1/tcp/0"]
SCHEMA_HASH = b"\x11" * 20


class DecentralizedAverager(ServicerBase):
    """Serves matchmaking under the handler names of the real averager (``<prefix>::DecentralizedAverager.*``)."""

    def __init__(self, matchmaking: Optional[Matchmaking] = None):
        self.matchmaking = matchmaking

    async def rpc_join_group(
        self, request: averaging_pb2.JoinRequest, context: P2PContext
    ) -> AsyncIterator[averaging_pb2.MessageFromLeader]:
        async for message in self.matchmaking.rpc_join_group(request, context):
            yield message


@dataclass
class Step:
    """What ``look_for_group`` reads from a step: the scheduled time, the deadline and the gather payload."""

    scheduled_time: float
    deadline: Optional[float]
    data_for_gather: bytes = field(default_factory=lambda: MSGPackSerializer.dumps([None, 0, b"\xc0"]))

    def get_timeout(self) -> Optional[float]:
        return None if self.deadline is None else max(0.0, self.deadline - get_dht_time())


def make_step(timeout: Optional[float] = 10.0, scheduled_in: float = 0.0, gather: object = None) -> Step:
    now = get_dht_time()
    payload = MSGPackSerializer.dumps([None, 0, MSGPackSerializer.dumps(gather)])
    return Step(now + scheduled_in, None if timeout is None else now + timeout, payload)


@dataclass
class Peer:
    dht: DHT
    p2p: P2P
    matchmaking: Matchmaking
    servicer: Optional[DecentralizedAverager]

    @property
    def peer_id(self):
        return self.p2p.peer_id


class Swarm:
    """Averaging peers for one test; ``await swarm.add(...)`` starts one, ``await swarm.close()`` stops all."""

    def __init__(self, prefix: str = "mm"):
        self.prefix = prefix
        self.peers: List[Peer] = []
        self._dhts: List[DHT] = []

    async def add(
        self,
        *,
        schema_hash: bytes = SCHEMA_HASH,
        client_mode: bool = False,
        serve: Optional[bool] = None,
        prefix: Optional[str] = None,
        min_matchmaking_time: float = 1.0,
        request_timeout: float = 0.5,
        target_group_size: Optional[int] = None,
        min_group_size: int = 2,
        initial_group_bits: str = "",
        initial_peers: Optional[List[str]] = None,
    ) -> Peer:
        if initial_peers is None:
            if not self._dhts and client_mode:  # client-mode DHTs need a full node to bootstrap from
                self._dhts.append(DHT(start=True, host_maddrs=LOCALHOST))
            initial_peers = self._dhts[0].get_visible_maddrs() if self._dhts else None
        dht = DHT(start=True, initial_peers=initial_peers, host_maddrs=LOCALHOST, client_mode=client_mode)
        self._dhts.append(dht)
        p2p = await dht.replicate_p2p()
        prefix = self.prefix if prefix is None else prefix
        matchmaking = Matchmaking(
            p2p,
            schema_hash,
            dht,
            servicer_type=DecentralizedAverager,
            prefix=prefix,
            target_group_size=target_group_size,
            min_group_size=min_group_size,
            min_matchmaking_time=min_matchmaking_time,
            request_timeout=request_timeout,
            client_mode=client_mode,
            initial_group_bits=initial_group_bits,
        )
        servicer = None
        if serve if serve is not None else not client_mode:
            servicer = DecentralizedAverager(matchmaking)
            await servicer.add_p2p_handlers(p2p, namespace=prefix)
        peer = Peer(dht, p2p, matchmaking, servicer)
        self.peers.append(peer)
        return peer

    async def add_many(self, count: int, **kwargs) -> List[Peer]:
        return [await self.add(**kwargs) for _ in range(count)]

    async def close(self) -> None:
        for peer in self.peers:
            with contextlib.suppress(Exception):
                await peer.p2p.shutdown()
        loop = asyncio.get_running_loop()
        await asyncio.gather(*(loop.run_in_executor(None, dht.shutdown) for dht in self._dhts))


@contextlib.asynccontextmanager
async def swarm_context(prefix: str = "mm") -> AsyncIterator[Swarm]:
    swarm = Swarm(prefix)
    try:
        yield swarm
    finally:
        await swarm.close()


async def look_for_groups(peers: List[Peer], steps: List[Step]) -> List[object]:
    """Run every peer's search at once; each result is a GroupInfo or the exception it raised."""
    return await asyncio.gather(
        *(peer.matchmaking.look_for_group(step) for peer, step in zip(peers, steps)), return_exceptions=True
    )


def groups_of(results: List[object]) -> List[GroupInfo]:
    """The distinct groups among results (each formed group appears once)."""
    unique = {}
    for result in results:
        if isinstance(result, GroupInfo):
            unique.setdefault(result.group_id, result)
    return list(unique.values())


def assert_consistent(peers: List[Peer], results: List[object]) -> None:
    """Every peer that got a group is in it, and all members of one group got the identical GroupInfo."""
    by_id = {}
    for peer, result in zip(peers, results):
        if isinstance(result, GroupInfo):
            assert peer.peer_id in result.peer_ids
            assert by_id.setdefault(result.group_id, result) == result
        else:
            assert isinstance(result, MatchmakingException), result
    for group in by_id.values():
        got_it = {peer.peer_id for peer, result in zip(peers, results) if result == group}
        assert set(group.peer_ids) == got_it


def spy_on_declarations(peers: List[Peer]) -> List[Tuple[PeerID, str]]:
    """Record ``(peer id, group key)`` for every declaration (looking_for_group=True) the peers make from now on."""
    calls = []
    for peer in peers:
        key_manager = peer.matchmaking.group_key_manager
        original = key_manager.declare_averager

        async def declare_averager(group_key, peer_id, expiration_time, looking_for_group=True, _original=original):
            if looking_for_group:
                calls.append((peer_id, group_key))
            return await _original(group_key, peer_id, expiration_time, looking_for_group)

        key_manager.declare_averager = declare_averager
    return calls


def random_schema_hash() -> bytes:
    return os.urandom(20)
