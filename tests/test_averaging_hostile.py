"""A DecentralizedAverager facing a hostile peer that leads it into a group and answers its parts with garbage:
its local tensors are never corrupted (real DHTs and p2pd daemons on 127.0.0.1)."""

import asyncio

import pytest
import torch
from allreduce_helpers import sender_messages
from averaging_hostile_peer import PREFIX, SplitViewLeader, delta_message, hostile_setup, run_step

from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.key_manager import GroupKeyManager
from hivemind.averaging.partition import TensorPartContainer
from hivemind.averaging.payload import encode_gather
from hivemind.dht import DHT
from hivemind.p2p import P2PHandlerError
from hivemind.p2p.p2p_daemon_bindings.utils import encode_varint
from hivemind.proto import averaging_pb2
from hivemind.utils.asyncio import as_aiter
from hivemind.utils.serializer import MSGPackSerializer
from hivemind.utils.timed_storage import get_dht_time

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")], ids=["nan", "inf"])
async def test_non_finite_deltas_from_a_reducer_leave_local_tensors_finite(bad_value):
    tensor = torch.arange(64, dtype=torch.float32)
    original = tensor.clone()
    async with hostile_setup([tensor], part_size_bytes=64) as (hostile, victim):
        hostile.make_delta = lambda message: delta_message(torch.full((16,), bad_value))
        outcome = await run_step(hostile, victim, timeout=20)
        assert hostile.parts_received, f"the victim never reached the hostile reducer: {outcome!r}"
        with victim.get_tensors() as (averaged,):
            assert torch.isfinite(averaged).all(), "a reducer's non-finite deltas reached the local tensors"
            assert torch.equal(averaged, original)  # alone with an aux peer: the average is its own values


def _nan_buffer(k, serialized):
    serialized.buffer = torch.full((16,), float("nan")).numpy().tobytes()


async def test_non_finite_parts_from_a_sender_are_refused_and_the_sender_excluded():
    tensor = torch.arange(64, dtype=torch.float32)
    original = tensor.clone()
    async with hostile_setup([tensor], part_size_bytes=64) as (hostile, victim):
        hostile.gather = encode_gather(None, 0, None)  # a full member: it also sends parts to the victim
        hostile.make_delta = lambda message: delta_message(torch.zeros(16))
        step = asyncio.create_task(run_step(hostile, victim, timeout=20))
        await asyncio.wait_for(hostile.joined.wait(), 15)
        container = TensorPartContainer([torch.zeros(64)], [1.0, 1.0], part_size_bytes=64)
        messages = sender_messages(container, 1, hostile.group_id, corrupt=_nan_buffer)
        stub = type(hostile).get_stub(hostile.p2p, victim.peer_id, namespace=PREFIX)
        replies = [reply async for reply in await stub.rpc_aggregate_part(as_aiter(*messages))]
        assert [reply.code for reply in replies] == [averaging_pb2.INTERNAL_ERROR]
        outcome = await step
        assert isinstance(outcome, dict), outcome
        with victim.get_tensors() as (averaged,):
            assert torch.equal(averaged, original), "a sender's NaN parts reached the local tensors"


async def _join_victim(hostile, victim, gather: bytes):
    """Send the victim (which must be searching) a well-formed join request carrying ``gather``; its replies."""
    key_manager = GroupKeyManager(hostile.dht, PREFIX)
    while victim.peer_id not in dict(await key_manager.get_averagers(f"{PREFIX}.0b", only_active=True)):
        await asyncio.sleep(0.05)
    request = averaging_pb2.JoinRequest(
        schema_hash=victim.schema_hash, expiration=get_dht_time() + 60, gather=gather, group_key=f"{PREFIX}.0b"
    )
    stub = type(hostile).get_stub(hostile.p2p, victim.peer_id, namespace=PREFIX)
    return [message async for message in await stub.rpc_join_group(request)]


@pytest.mark.parametrize(
    "gather",
    [b"\xc1garbage", MSGPackSerializer.dumps([None, 7, MSGPackSerializer.dumps(None)]), MSGPackSerializer.dumps(1)],
    ids=["not-msgpack", "unknown-mode", "not-a-triple"],
)
async def test_leader_refuses_a_join_request_with_a_malformed_gather(gather):
    async with hostile_setup([torch.zeros(4)], target_group_size=2, min_matchmaking_time=5.0) as (hostile, victim):
        control = victim.step(wait=False, timeout=15, allow_retries=False)
        replies = await asyncio.wait_for(_join_victim(hostile, victim, gather), 10)
        assert [message.code for message in replies] == [averaging_pb2.PROTOCOL_VIOLATION]
        control.cancel()


@pytest.mark.parametrize("weight, value", [(1e38, 100.0), (1e300, 0.0)], ids=["product-overflows", "weight-overflows"])
async def test_a_sender_weight_that_overflows_the_sum_is_refused(weight, value):
    tensor = torch.arange(64, dtype=torch.float32)
    original = tensor.clone()
    async with hostile_setup([tensor], part_size_bytes=64) as (hostile, victim):
        hostile.gather = encode_gather(None, 0, None)
        hostile.make_delta = lambda message: delta_message(torch.zeros(16))
        step = asyncio.create_task(run_step(hostile, victim, timeout=20))
        await asyncio.wait_for(hostile.joined.wait(), 15)
        container = TensorPartContainer([torch.full((64,), value)], [1.0, 1.0], part_size_bytes=64)
        messages = sender_messages(container, 1, hostile.group_id, weight=weight)  # inf in float32: inf * 0 = NaN
        stub = type(hostile).get_stub(hostile.p2p, victim.peer_id, namespace=PREFIX)
        replies = [reply async for reply in await stub.rpc_aggregate_part(as_aiter(*messages))]
        assert [reply.code for reply in replies] == [averaging_pb2.INTERNAL_ERROR]
        assert isinstance(await step, dict)
        with victim.get_tensors() as (averaged,):
            assert torch.equal(averaged, original), "an overflowing weighted sum reached the local tensors"


@pytest.mark.parametrize("handler", ["rpc_aggregate_part", "rpc_join_group", "rpc_download_state"])
async def test_a_message_far_larger_than_the_handler_needs_is_refused_unread(handler):
    """The averager's handlers take messages of a part, a join request or an empty request: a 16 MiB one is refused
    on its announced size instead of being buffered (several per stream, for seconds)."""
    huge = b"\x00" * (16 * 2**20)
    message = {
        "rpc_aggregate_part": averaging_pb2.AveragingData(group_id=b"\x01" * 20, tensor_part=dict(buffer=huge)),
        "rpc_join_group": averaging_pb2.JoinRequest(gather=huge),
        "rpc_download_state": averaging_pb2.DownloadRequest(),
    }[handler]
    async with hostile_setup([torch.zeros(4)]) as (hostile, victim):
        stub = type(victim).get_stub(hostile.p2p, victim.peer_id, namespace=PREFIX)
        if handler == "rpc_download_state":  # an unknown field of 16 MiB: still a valid DownloadRequest
            message.ParseFromString(b"\x7a" + encode_varint(len(huge)) + huge)
        with pytest.raises(P2PHandlerError, match="byte"):
            async for _ in await getattr(stub, handler)(
                as_aiter(message) if handler == "rpc_aggregate_part" else message
            ):
                pass


async def test_a_leader_that_tells_members_different_orders_cannot_mix_their_parts():
    """Each member sees [leader, itself, other]: both think they reduce the first half. Without a check, each
    averages its first half with the other's second half and reports success."""
    values = [torch.arange(64, dtype=torch.float32), 1000 + torch.arange(64, dtype=torch.float32)]
    dhts, averagers = [DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])], []
    try:
        for _ in range(2):
            dhts.append(
                DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=dhts[0].get_visible_maddrs())
            )
        p2p = await dhts[0].replicate_p2p()
        leader = SplitViewLeader(p2p)
        await leader.add_p2p_handlers(p2p, namespace=PREFIX)
        options = dict(min_matchmaking_time=3.0, request_timeout=1.0, sender_timeout=1.0, reducer_timeout=2.0)
        for dht, tensor in zip(dhts[1:], values):
            averagers.append(
                DecentralizedAverager([tensor.clone()], dht, prefix=PREFIX, start=True, part_size_bytes=64, **options)
            )
        expiration = get_dht_time() + 2.0
        assert await GroupKeyManager(dhts[0], PREFIX).declare_averager(f"{PREFIX}.0b", p2p.peer_id, expiration)
        controls = [averager.step(wait=False, timeout=20) for averager in averagers]
        loop = asyncio.get_running_loop()
        await asyncio.gather(*(loop.run_in_executor(None, control.exception, 30) for control in controls))
        assert leader.both_joined.is_set()
        for averager, original in zip(averagers, values):
            with averager.get_tensors() as (tensor,):
                assert torch.equal(tensor, original), "parts of different positions were averaged together"
    finally:
        for averager in averagers:
            averager.shutdown()
        for dht in dhts:
            dht.shutdown()
