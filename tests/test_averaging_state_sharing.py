"""State sharing over real daemons: declaring donors in the DHT, serving downloads, and loading a state with fail-over.

Donors here are small servicers named ``DecentralizedAverager`` (the handler names the averager uses) that serve
either a real StateSharing or a hand-made (misbehaving) stream.
"""

import asyncio
import os
import signal
import uuid
from typing import AsyncIterator, Callable, List

import pytest
import torch

import hivemind
from hivemind.averaging.state_download import StateAssembler, load_state_from_peers
from hivemind.averaging.state_sharing import StateSharing, all_averagers_key
from hivemind.compression import Float16Compression, NoCompression, serialize_torch_tensor
from hivemind.p2p import P2PContext, P2PHandlerError, ServicerBase
from hivemind.proto import averaging_pb2
from hivemind.utils import MSGPackSerializer, get_dht_time
from hivemind.utils.streaming import split_for_streaming


class DecentralizedAverager(ServicerBase):
    """Serves rpc_download_state with any async-generator function (request, context) -> DownloadData messages."""

    def __init__(self, serve: Callable):
        self.serve = serve

    async def rpc_download_state(
        self, request: averaging_pb2.DownloadRequest, context: P2PContext
    ) -> AsyncIterator[averaging_pb2.DownloadData]:
        async for message in self.serve(request, context):
            yield message


@pytest.fixture(scope="module")
def dht():
    with hivemind.DHT(start=True) as instance:
        yield instance


@pytest.fixture
def prefix() -> str:
    return f"state_{uuid.uuid4().hex[:8]}"


def make_state(seed: int):
    generator = torch.Generator().manual_seed(seed)
    metadata = {"donor": seed, "group_key": "0b01"}
    tensors = [torch.randn(50_000, generator=generator), torch.arange(seed, seed + 7), torch.zeros(0, 3)]
    return metadata, tensors


def sharing_for(dht, p2p, prefix, state, **kwargs) -> StateSharing:
    async def get_current_state():
        return state[0], state[1], None

    return StateSharing(dht=dht, peer_id=p2p.peer_id, prefix=prefix, get_current_state=get_current_state, **kwargs)


async def serve(p2p, prefix, handler) -> None:
    await DecentralizedAverager(handler).add_p2p_handlers(p2p, namespace=prefix)


async def declare(dht, prefix, p2p, priority) -> None:
    assert await dht.store(
        all_averagers_key(prefix), priority, get_dht_time() + 60, subkey=p2p.peer_id.to_bytes(), return_future=True
    )


async def start_peers(p2p_factory, count: int):
    first = await p2p_factory()
    others = [await p2p_factory(initial_peers=await first.get_visible_maddrs()) for _ in range(count - 1)]
    peers = [first, *others]
    client = await p2p_factory(initial_peers=[addr for p in peers for addr in await p.get_visible_maddrs()])
    await client.wait_for_at_least_n_peers(count, attempts=100, delay=0.05)
    return peers, client


async def load(client, dht, prefix, expected=None, **kwargs):
    return await load_state_from_peers(
        p2p=client,
        dht=dht,
        prefix=prefix,
        servicer_type=DecentralizedAverager,
        own_peer_id=client.peer_id,
        expected_tensors=expected,
        **kwargs,
    )


def assert_state_equal(result, state) -> None:
    assert result is not None
    metadata, tensors = result
    assert metadata == state[0]
    assert len(tensors) == len(state[1])
    for got, sent in zip(tensors, state[1]):
        assert got.dtype == sent.dtype and got.shape == sent.shape and torch.equal(got, sent)


async def honest_donor(dht, p2p, prefix, seed, priority, **kwargs):
    state = make_state(seed)
    sharing = sharing_for(dht, p2p, prefix, state, state_sharing_priority=priority, **kwargs)
    await serve(p2p, prefix, sharing.rpc_download_state)
    assert await sharing.declare()
    return sharing, state


@pytest.mark.timeout(60)
async def test_loads_exact_state_from_a_live_peer(dht, p2p_factory, prefix):
    (donor,), client = await start_peers(p2p_factory, 1)
    _, state = await honest_donor(dht, donor, prefix, seed=1, priority=1.0)
    assert_state_equal(await load(client, dht, prefix, expected=state[1]), state)
    assert_state_equal(await load(client, dht, prefix), state)  # without knowing the schema too


@pytest.mark.timeout(60)
async def test_compressed_state(dht, p2p_factory, prefix):
    (donor,), client = await start_peers(p2p_factory, 1)
    _, state = await honest_donor(dht, donor, prefix, seed=1, priority=1.0, state_compression=Float16Compression())
    metadata, tensors = await load(client, dht, prefix, expected=state[1])
    assert metadata == state[0]
    assert tensors[0].dtype == torch.float32 and torch.allclose(tensors[0], state[1][0], atol=1e-2)
    assert not torch.equal(tensors[0], state[1][0])  # it really went through float16


@pytest.mark.timeout(60)
async def test_highest_priority_donor_wins_and_switching_off_moves_to_the_next(dht, p2p_factory, prefix):
    donors, client = await start_peers(p2p_factory, 3)
    sharings = []
    for seed, (p2p, priority) in enumerate(zip(donors, [1.0, 5.0, 3.0])):
        sharings.append(await honest_donor(dht, p2p, prefix, seed, priority))
    assert_state_equal(await load(client, dht, prefix), sharings[1][1])

    sharings[1][0].allow_state_sharing = False
    assert await sharings[1][0].declare()  # now declares None
    assert_state_equal(await load(client, dht, prefix), sharings[2][1])


@pytest.mark.timeout(60)
async def test_nobody_shares_gives_none(dht, p2p_factory, prefix):
    (donor,), client = await start_peers(p2p_factory, 1)
    assert await load(client, dht, prefix) is None  # no entry at all

    sharing, _ = await honest_donor(dht, donor, prefix, seed=1, priority=1.0)
    sharing.allow_state_sharing = False  # declared, but serves nothing now: an empty stream
    assert await load(client, dht, prefix) is None


@pytest.mark.timeout(60)
async def test_own_declaration_is_skipped(dht, p2p_factory, prefix):
    (donor,), client = await start_peers(p2p_factory, 1)
    await honest_donor(dht, client, prefix, seed=1, priority=10.0)  # the client itself shares
    assert await load(client, dht, prefix) is None


def messages_of(state, chunk_size=2**16) -> List[averaging_pb2.DownloadData]:
    messages = []
    for tensor in state[1]:
        for chunk in split_for_streaming(serialize_torch_tensor(tensor), chunk_size):
            messages.append(averaging_pb2.DownloadData(tensor_part=chunk))
    messages[0].metadata = MSGPackSerializer.dumps(state[0])
    return messages


def cut_at_tensor_boundary(messages):
    return messages[:-2]  # the last two tensors are one message each


def cut_inside_tensor(messages):
    return messages[:2]  # 2 of the first tensor's 4 chunks


def garbage_metadata(messages):
    messages[0].metadata = b"\xc1 not msgpack"
    return messages


def wrong_shape(messages):
    messages[-2].tensor_part.size[:] = [8]
    return messages


def no_metadata(messages):
    messages[0].ClearField("metadata")
    return messages


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "spoil", [cut_at_tensor_boundary, cut_inside_tensor, garbage_metadata, wrong_shape, no_metadata]
)
async def test_misbehaving_donor_is_skipped_for_the_next_one(dht, p2p_factory, prefix, spoil):
    (bad, good), client = await start_peers(p2p_factory, 2)
    _, good_state = await honest_donor(dht, good, prefix, seed=2, priority=1.0)
    bad_messages = spoil(messages_of(make_state(seed=1)))

    async def serve_spoiled(request, context):
        for message in bad_messages:
            yield message

    await serve(bad, prefix, serve_spoiled)
    await declare(dht, prefix, bad, 100.0)
    assert_state_equal(await load(client, dht, prefix, expected=good_state[1]), good_state)


@pytest.mark.timeout(60)
async def test_stream_cut_inside_a_tensor_is_refused_without_a_schema(dht, p2p_factory, prefix):
    (bad,), client = await start_peers(p2p_factory, 1)
    bad_messages = cut_inside_tensor(messages_of(make_state(seed=1)))

    async def serve_spoiled(request, context):
        for message in bad_messages:
            yield message

    await serve(bad, prefix, serve_spoiled)
    await declare(dht, prefix, bad, 100.0)
    assert await load(client, dht, prefix) is None  # not a truncated state passed off as whole


@pytest.mark.timeout(60)
@pytest.mark.parametrize("inside_tensor", [False, True], ids=["between-tensors", "inside-a-tensor"])
async def test_donor_killed_mid_download_falls_back_to_the_next(dht, p2p_factory, prefix, inside_tensor, monkeypatch):
    (doomed, good), client = await start_peers(p2p_factory, 2)
    _, good_state = await honest_donor(dht, good, prefix, seed=2, priority=1.0)
    messages = messages_of(make_state(seed=1))
    sent_before_death = 2 if inside_tensor else len(messages) - 2
    received_them = asyncio.Event()
    original_add = StateAssembler.add

    def add_and_watch(assembler, message):  # the client saw every message sent before the kill
        result = original_add(assembler, message)
        if assembler.num_messages == sent_before_death:
            received_them.set()
        return result

    monkeypatch.setattr(StateAssembler, "add", add_and_watch)

    async def serve_then_hang(request, context):
        for message in messages[:sent_before_death]:
            yield message
        await asyncio.Event().wait()  # the daemon is killed while we are here

    await serve(doomed, prefix, serve_then_hang)
    await declare(dht, prefix, doomed, 100.0)

    async def kill_when_received():
        await received_them.wait()
        os.kill(doomed._daemon.pid, signal.SIGKILL)

    killer = asyncio.create_task(kill_when_received())
    result = await load(client, dht, prefix, expected=good_state[1], timeout=30)
    assert killer.done()  # the doomed donor was really tried first and died mid-download
    assert_state_equal(result, good_state)


@pytest.mark.timeout(60)
async def test_stalled_donor_is_abandoned_after_next_chunk_timeout(dht, p2p_factory, prefix):
    (stalled, good), client = await start_peers(p2p_factory, 2)
    _, good_state = await honest_donor(dht, good, prefix, seed=2, priority=1.0)
    messages = messages_of(make_state(seed=1))

    async def serve_then_stall(request, context):
        yield messages[0]
        await asyncio.Event().wait()

    await serve(stalled, prefix, serve_then_stall)
    await declare(dht, prefix, stalled, 100.0)
    result = await load(client, dht, prefix, expected=good_state[1], next_chunk_timeout=0.5)
    assert_state_equal(result, good_state)


@pytest.mark.timeout(60)
async def test_donor_refuses_downloads_beyond_its_limit(dht, p2p_factory, prefix):
    (donor,), client = await start_peers(p2p_factory, 1)
    other_client = await p2p_factory(initial_peers=await donor.get_visible_maddrs())
    await other_client.wait_for_at_least_n_peers(1, attempts=100, delay=0.05)
    state, release, asked = make_state(seed=1), asyncio.Event(), asyncio.Event()

    async def slow_state():
        asked.set()
        await release.wait()
        return state[0], state[1], None

    sharing = StateSharing(
        dht=dht,
        peer_id=donor.peer_id,
        prefix=prefix,
        get_current_state=slow_state,
        max_concurrent_downloads=1,
        max_queued_downloads=0,
    )
    await serve(donor, prefix, sharing.rpc_download_state)
    assert await sharing.declare()

    first = asyncio.create_task(load(client, dht, prefix))
    await asked.wait()  # the first download holds the only slot
    # refused at once, not queued (and asked again, busy again, until the newcomer's time runs out)
    assert await load(other_client, dht, prefix, timeout=1.0) is None
    release.set()
    assert_state_equal(await first, state)
    assert sharing.slots.active == 0


async def one_slot_donor_held_until_released(dht, p2p_factory, donor, prefix, **kwargs):
    """A donor with one download slot and a queue of one, whose state is ready only once ``release`` is set; also a
    second client connected to it. Returns ``(sharing, state, asked, release, other_client)``."""
    other_client = await p2p_factory(initial_peers=await donor.get_visible_maddrs())
    await other_client.wait_for_at_least_n_peers(1, attempts=100, delay=0.05)
    state, release, asked = make_state(seed=1), asyncio.Event(), asyncio.Event()

    async def slow_state():
        asked.set()
        await release.wait()
        return state[0], state[1], None

    sharing = StateSharing(
        dht=dht,
        peer_id=donor.peer_id,
        prefix=prefix,
        get_current_state=slow_state,
        max_concurrent_downloads=1,
        max_queued_downloads=1,
        max_queue_wait=30,
        **kwargs,
    )
    await serve(donor, prefix, sharing.rpc_download_state)
    assert await sharing.declare()
    return sharing, state, asked, release, other_client


@pytest.mark.timeout(60)
async def test_queued_download_proceeds_when_a_slot_frees(dht, p2p_factory, prefix):
    (donor,), client = await start_peers(p2p_factory, 1)
    sharing, state, asked, release, other_client = await one_slot_donor_held_until_released(
        dht, p2p_factory, donor, prefix
    )

    first = asyncio.create_task(load(client, dht, prefix))
    await asked.wait()
    second = asyncio.create_task(load(other_client, dht, prefix))
    while sharing.slots.waiting == 0:  # the second download reached the donor's queue
        await asyncio.sleep(0.01)
    release.set()
    assert_state_equal(await first, state)
    assert_state_equal(await second, state)


@pytest.mark.timeout(60)
async def test_downloader_that_stops_reading_is_dropped_and_frees_its_slot(dht, p2p_factory, prefix):
    (donor,), client = await start_peers(p2p_factory, 1)
    big_state = ({"big": True}, [torch.zeros(16 * 2**20, dtype=torch.uint8) for _ in range(4)])  # 64 MiB

    async def get_state():
        return big_state[0], big_state[1], None

    sharing = StateSharing(
        dht=dht,
        peer_id=donor.peer_id,
        prefix=prefix,
        get_current_state=get_state,
        state_compression=NoCompression(),
        max_concurrent_downloads=1,
        send_stall_timeout=0.5,
    )
    await serve(donor, prefix, sharing.rpc_download_state)
    stub = DecentralizedAverager.get_stub(client, donor.peer_id, namespace=prefix)
    request = averaging_pb2.DownloadRequest()
    stream = await stub.rpc_download_state(request)
    await stream.__anext__()  # started, then we stop reading: buffers fill and the donor's send blocks
    while sharing.slots.active:
        await asyncio.sleep(0.05)
    with pytest.raises(P2PHandlerError, match="was cancelled"):
        async for _ in stream:
            pass
    assert sharing.slots.active == 0 and sharing.snapshots.in_use == []  # the snapshot went with it


@pytest.mark.timeout(60)
async def test_declare_loop_announces_changes_and_withdraws_on_shutdown(dht, p2p_factory, prefix):
    (donor,), client = await start_peers(p2p_factory, 1)
    sharing = sharing_for(dht, donor, prefix, make_state(1), state_sharing_priority=2.0, declare_state_period=30)
    key = all_averagers_key(prefix)

    async def declared_value():
        result = await dht.get(key, latest=True, return_future=True)
        entry = None if result is None else result.value.get(donor.peer_id.to_bytes())
        return None if entry is None else entry.value

    async def wait_for(value):
        for _ in range(200):
            if await declared_value() == value:
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"the DHT never showed {value!r}, last {await declared_value()!r}")

    await sharing.start()
    await wait_for(2.0)
    sharing.state_sharing_priority = 7.5
    await wait_for(7.5)
    sharing.allow_state_sharing = False
    await wait_for(None)
    sharing.allow_state_sharing = True
    await wait_for(7.5)
    await sharing.shutdown()
    assert await declared_value() is None


def test_client_mode_cannot_share(dht):
    async def get_state():
        raise AssertionError("never called")

    kwargs = dict(dht=dht, peer_id=dht.peer_id, prefix="x", get_current_state=get_state, client_mode=True)
    with pytest.raises(ValueError, match="client-mode"):
        StateSharing(**kwargs, allow_state_sharing=True)
    sharing = StateSharing(**kwargs, allow_state_sharing=False)
    with pytest.raises(ValueError, match="client-mode"):
        sharing.allow_state_sharing = True
    with pytest.raises(ValueError, match="non-zero priority"):
        sharing.state_sharing_priority = 1.0


@pytest.mark.timeout(60)
async def test_overlapping_downloads_share_one_get_current_state_call(dht, p2p_factory, prefix):
    (donor,), client = await start_peers(p2p_factory, 1)
    others = [await p2p_factory(initial_peers=await donor.get_visible_maddrs()) for _ in range(2)]
    for other in others:
        await other.wait_for_at_least_n_peers(1, attempts=100, delay=0.05)
    state, release, calls = make_state(seed=3), asyncio.Event(), []

    async def counted_state():  # in an averager: one request through the pipe and one copy of the state each
        calls.append(asyncio.get_running_loop().time())
        await release.wait()
        return state[0], state[1], None

    sharing = StateSharing(dht=dht, peer_id=donor.peer_id, prefix=prefix, get_current_state=counted_state)
    await serve(donor, prefix, sharing.rpc_download_state)
    assert await sharing.declare()

    downloads = [asyncio.create_task(load(peer, dht, prefix)) for peer in [client, *others]]
    while sharing.slots.active < 3:  # all three downloads reached the donor, waiting for the state
        await asyncio.sleep(0.01)
    release.set()
    for download in downloads:
        assert_state_equal(await download, state)
    assert len(calls) == 1
    assert sharing.snapshots.in_use == []  # dropped with its last download


@pytest.mark.timeout(60)
async def test_donor_that_prepares_its_state_longer_than_request_timeout_is_waited_for(dht, p2p_factory, prefix):
    (donor,), client = await start_peers(p2p_factory, 1)
    state = make_state(seed=4)

    async def slow_state():  # e.g. a large state copied in a busy user's process, or a download queued for a slot
        await asyncio.sleep(1.5)
        return state[0], state[1], None

    sharing = StateSharing(dht=dht, peer_id=donor.peer_id, prefix=prefix, get_current_state=slow_state)
    await serve(donor, prefix, sharing.rpc_download_state)
    assert await sharing.declare()
    # the limit between two messages (request_timeout when a timeout is given) does not apply before the first one
    assert_state_equal(await load(client, dht, prefix, timeout=20, request_timeout=0.5), state)
