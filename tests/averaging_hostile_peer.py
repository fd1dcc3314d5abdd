"""A hostile peer for averager tests: it declares itself under an averager's group key, leads the averager into a
group it scripts, and answers the averager's parts with whatever the test wants (real DHT and p2pd on 127.0.0.1)."""

import asyncio
import contextlib
import os
from typing import AsyncIterator, Callable, List, Optional

import torch

from hivemind.averaging.averager import DecentralizedAverager as RealAverager
from hivemind.averaging.key_manager import GroupKeyManager
from hivemind.averaging.payload import encode_gather
from hivemind.dht import DHT
from hivemind.p2p import P2P, P2PContext, ServicerBase
from hivemind.proto import averaging_pb2
from hivemind.utils.timed_storage import get_dht_time

Code = averaging_pb2.MessageCode
Part = averaging_pb2.AveragingData
PREFIX = "hostile"
AUX_GATHER = encode_gather(None, 2, None)  # an auxiliary member: reduces the victim's parts, sends none


class HostilePeer(ServicerBase):
    """Leads every join request into ``[self, requester]`` (or ``make_group(request, context)``), then replies to
    each part sent to it with ``make_delta(part_message)`` (None: stay silent)."""

    def __init__(self, p2p: P2P):
        self.p2p = p2p
        self.group_id = os.urandom(20)
        self.gather = AUX_GATHER
        self.make_group: Optional[Callable] = None
        self.make_delta: Callable = lambda message: None
        self.joined = asyncio.Event()
        self.parts_received: List[averaging_pb2.AveragingData] = []
        self.stall = False  # after the parts, keep the stream open without replying
        self.reply_delay = 0.0  # seconds to wait before each reply (a reducer that drips its replies)

    async def rpc_join_group(
        self, request: averaging_pb2.JoinRequest, context: P2PContext
    ) -> AsyncIterator[averaging_pb2.MessageFromLeader]:
        yield averaging_pb2.MessageFromLeader(code=Code.ACCEPTED)
        if self.make_group is not None:
            message = self.make_group(request, context)
        else:
            message = averaging_pb2.MessageFromLeader(
                code=Code.BEGIN_ALLREDUCE,
                group_id=self.group_id,
                ordered_peer_ids=[self.p2p.peer_id.to_bytes(), context.remote_id.to_bytes()],
                gathered=[self.gather, request.gather],
            )
        self.joined.set()
        yield message

    async def rpc_aggregate_part(self, stream: AsyncIterator[Part], context: P2PContext) -> AsyncIterator[Part]:
        async for message in stream:
            self.parts_received.append(message)
            reply = self.make_delta(message)
            if reply is not None:
                await asyncio.sleep(self.reply_delay)
                yield reply
        if self.stall:
            await asyncio.Event().wait()


HostilePeer.__name__ = "DecentralizedAverager"  # served under the averager's handler names


def delta_message(values: torch.Tensor) -> averaging_pb2.AveragingData:
    from hivemind.compression import serialize_torch_tensor

    return averaging_pb2.AveragingData(code=Code.AVERAGED_PART, tensor_part=serialize_torch_tensor(values))


@contextlib.asynccontextmanager
async def hostile_setup(tensors, **averager_kwargs):
    """Yields ``(hostile, victim)``: a HostilePeer declared under ``hostile.0b`` so that the victim averager (a
    real DecentralizedAverager with ``tensors``) asks it to lead."""
    hostile_dht = DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    victim_dht = victim = None
    try:
        victim_dht = DHT(
            start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=hostile_dht.get_visible_maddrs()
        )
        p2p = await hostile_dht.replicate_p2p()
        hostile = HostilePeer(p2p)
        await hostile.add_p2p_handlers(p2p, namespace=PREFIX)
        hostile.dht = hostile_dht
        options = dict(min_matchmaking_time=2.0, request_timeout=1.0, sender_timeout=1.0, reducer_timeout=2.0)
        options.update(averager_kwargs)
        victim = RealAverager(tensors, victim_dht, prefix=PREFIX, start=True, **options)
        yield hostile, victim
    finally:
        if victim is not None:
            victim.shutdown()
        for dht in (victim_dht, hostile_dht):
            if dht is not None:
                dht.shutdown()


async def run_step(hostile, victim, **step_kwargs):
    """The victim's step (in a thread, so that the hostile peer keeps serving): its result, or the exception.

    The hostile peer declares itself first, expiring before the victim's own search ends, so the victim asks it to
    lead (the victim declares now + min_matchmaking_time)."""
    expiration = get_dht_time() + 1.0
    assert await GroupKeyManager(hostile.dht, PREFIX).declare_averager(f"{PREFIX}.0b", hostile.p2p.peer_id, expiration)
    control = victim.step(wait=False, **step_kwargs)
    loop = asyncio.get_running_loop()
    try:
        return await loop.run_in_executor(None, control.result, 30)
    except Exception as e:
        return e


class SplitViewLeader(HostilePeer):
    """Leads two members into one group but tells each a different order: ``[self, requester, other]``."""

    def __init__(self, p2p: P2P):
        super().__init__(p2p)
        self.requests = {}
        self.both_joined = asyncio.Event()

    async def rpc_join_group(
        self, request: averaging_pb2.JoinRequest, context: P2PContext
    ) -> AsyncIterator[averaging_pb2.MessageFromLeader]:
        yield averaging_pb2.MessageFromLeader(code=Code.ACCEPTED)
        self.requests[context.remote_id] = request
        if len(self.requests) == 2:
            self.both_joined.set()
        await self.both_joined.wait()
        (other,) = [peer for peer in self.requests if peer != context.remote_id]
        yield averaging_pb2.MessageFromLeader(
            code=Code.BEGIN_ALLREDUCE,
            group_id=self.group_id,
            ordered_peer_ids=[peer.to_bytes() for peer in (self.p2p.peer_id, context.remote_id, other)],
            gathered=[encode_gather(0.0, 2, None), request.gather, self.requests[other].gather],
        )


SplitViewLeader.__name__ = "DecentralizedAverager"


def item_bomb_gather(mode: int = 0) -> bytes:
    """A well-formed gather payload of at most MAX_GATHER_BYTES whose user object is ~262,000 empty lists: one byte
    of msgpack each, ~70 bytes of memory each once decoded (~18 MB for the payload)."""
    from hivemind.averaging.matchmaking_rules import MAX_GATHER_BYTES
    from hivemind.utils.serializer import MSGPackSerializer

    count = MAX_GATHER_BYTES - 64
    user_bytes = b"\xdd" + count.to_bytes(4, "big") + b"\x90" * count  # array32 of empty fixarrays
    payload = MSGPackSerializer.dumps([None, mode, user_bytes])
    assert len(payload) <= MAX_GATHER_BYTES
    return payload
