"""Matchmaking between an averager of the original hivemind 1.1.12 and our Matchmaking.

The original runs a full DecentralizedAverager in its own interpreter; ours runs Matchmaking in the test process with
a small servicer. Either side leads, depending on who declares the earlier expiration. The proof that the original
took the same group comes from the all-reduce that follows: its 3-element tensor is one part, reduced by one member;
either the original sends it to us with the group id, or it averages the part we send it under that group id.
"""

import asyncio
import json
import queue
import subprocess
import tempfile
import threading
import time
from typing import AsyncIterator

import pytest
import torch
from averaging_matchmaking_swarm import DecentralizedAverager, Step, swarm_context

from hivemind.averaging.group_info import GroupInfo
from hivemind.compression import serialize_torch_tensor
from hivemind.p2p import P2PContext, PeerID
from hivemind.proto import averaging_pb2
from hivemind.utils.asyncio import anext, as_aiter
from hivemind.utils.serializer import MSGPackSerializer
from hivemind.utils.timed_storage import get_dht_time

from .harness import kill_tree, process_env, python_command

pytestmark = [pytest.mark.interop, pytest.mark.timeout(90)]

ORIGINAL_AVERAGER = r"""
import json, sys, torch, hivemind
from hivemind.utils import get_dht_time
dht = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
averager = hivemind.averaging.DecentralizedAverager(
    [torch.zeros(3)], dht, prefix="mm", start=True, min_matchmaking_time=2.0, request_timeout=1.0)
assert hivemind.__version__ == "1.1.12", hivemind.__file__
print(json.dumps(dict(maddrs=[str(m) for m in dht.get_visible_maddrs()], schema_hash=averager.schema_hash.hex(),
                      peer_id=dht.peer_id.to_base58())), flush=True)
for line in sys.stdin:
    command = json.loads(line)
    try:
        result = averager.step(gather=command["gather"], scheduled_time=get_dht_time() + command["scheduled_in"],
                               timeout=command["timeout"], allow_retries=False)
        print(json.dumps(dict(gathered={str(peer): value for peer, value in result.items()})), flush=True)
    except BaseException as e:
        print(json.dumps(dict(error=repr(e))), flush=True)
"""


class InteropAverager(DecentralizedAverager):
    """Also records the all-reduce calls that arrive once a group has formed (ours does not average here)."""

    def __init__(self, matchmaking):
        super().__init__(matchmaking)
        self.allreduce_group_ids = asyncio.Queue()

    async def rpc_aggregate_part(
        self, parts: AsyncIterator[averaging_pb2.AveragingData], context: P2PContext
    ) -> AsyncIterator[averaging_pb2.AveragingData]:
        async for message in parts:
            self.allreduce_group_ids.put_nowait(message.group_id)
            break
        yield averaging_pb2.AveragingData(code=averaging_pb2.MessageCode.CANCELLED)


InteropAverager.__name__ = "DecentralizedAverager"


@pytest.fixture
def original_averager(original_env, interop_log_dir):
    log = open(interop_log_dir / "original-averager.log", "ab")
    proc = subprocess.Popen(
        [*python_command("original"), "-c", ORIGINAL_AVERAGER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=log,
        env=process_env("original"),
        cwd=tempfile.gettempdir(),  # never a directory holding our `hivemind` package
        start_new_session=True,
        text=True,
    )
    proc.lines = follow_stdout(proc)
    try:
        yield proc
    finally:
        kill_tree(proc)
        log.close()


def follow_stdout(proc) -> "queue.Queue[str]":
    """Lines of the process's stdout, read by a daemon thread (a blocked read never holds up the event loop)."""
    lines = queue.Queue()

    def read() -> None:
        for line in proc.stdout:
            lines.put(line)
        lines.put("")

    threading.Thread(target=read, daemon=True).start()
    return lines


async def read_json_line(proc, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        try:
            line = proc.lines.get_nowait()
            break
        except queue.Empty:
            assert time.monotonic() < deadline, f"no output from the original averager in {timeout} s; see its log"
            await asyncio.sleep(0.05)
    assert line, f"the original averager exited (return code {proc.poll()}); see its log"
    return json.loads(line)


async def start_ours(swarm, info: dict):
    schema_hash = bytes.fromhex(info["schema_hash"])
    peer = await swarm.add(schema_hash=schema_hash, serve=False, request_timeout=1.0, initial_peers=info["maddrs"])
    servicer = InteropAverager(peer.matchmaking)
    await servicer.add_p2p_handlers(peer.p2p, namespace="mm")
    return peer, servicer


async def original_runs_allreduce(ours, original_id: PeerID, servicer: InteropAverager, group_id: bytes) -> bool:
    """Whether the original either sent us a part of ``group_id`` or averaged the part we sent it."""

    async def it_sent_us_a_part() -> bool:
        return await servicer.allreduce_group_ids.get() == group_id

    async def it_averaged_our_part() -> bool:
        part = averaging_pb2.AveragingData(
            code=averaging_pb2.MessageCode.PART_FOR_AVERAGING,
            group_id=group_id,
            tensor_part=serialize_torch_tensor(torch.zeros(3)),
            weight=1.0,
        )
        try:
            stub = InteropAverager.get_stub(ours.p2p, original_id, namespace="mm")
            replies = await stub.rpc_aggregate_part(as_aiter(part))
            if (await anext(replies)).code == averaging_pb2.MessageCode.AVERAGED_PART:
                return True
        except Exception:
            pass  # the original is not the reducer of the part: it sends to us instead
        await asyncio.Event().wait()

    tasks = [asyncio.create_task(it_sent_us_a_part()), asyncio.create_task(it_averaged_our_part())]
    try:
        done, _ = await asyncio.wait(tasks, timeout=20, return_when=asyncio.FIRST_COMPLETED)
        return any(task.result() for task in done)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def our_step(scheduled_in: float, gather) -> Step:
    now = get_dht_time()
    payload = MSGPackSerializer.dumps([None, 0, MSGPackSerializer.dumps(gather)])
    return Step(scheduled_time=now + scheduled_in, deadline=now + 20, data_for_gather=payload)


@pytest.mark.parametrize("leader", ["ours", "original"])
async def test_original_and_ours_form_a_group(original_averager, leader):
    info = await read_json_line(original_averager)
    async with swarm_context() as swarm:
        ours, servicer = await start_ours(swarm, info)
        original_id = PeerID.from_base58(info["peer_id"])
        # the peer with the earlier declared expiration leads; the other asks it
        ours_in, original_in = (0.0, 4.0) if leader == "ours" else (6.0, 0.0)
        original_averager.stdin.write(json.dumps(dict(gather="from-original", scheduled_in=original_in, timeout=20)))
        original_averager.stdin.write("\n")
        original_averager.stdin.flush()
        group = await ours.matchmaking.look_for_group(our_step(ours_in, "from-ours"))

        assert isinstance(group, GroupInfo) and set(group.peer_ids) == {ours.peer_id, original_id}
        gathered = dict(zip(group.peer_ids, group.gathered))
        bandwidth, mode, user_bytes = MSGPackSerializer.loads(gathered[original_id])
        assert mode == 0 and MSGPackSerializer.loads(user_bytes) == "from-original"
        # the original took the same group: its all-reduce exchanges the part under our group id
        assert await original_runs_allreduce(ours, original_id, servicer, group.group_id)
