"""The averaging part of benchmarks/hostile_peers.py (``--averaging``): a hostile peer against two honest averagers.

Two ``DecentralizedAverager`` processes (each with its own DHT and p2pd) keep averaging one tensor in groups of two
(a checker thread runs a step on both at once and counts the rounds in which both got the average of their values),
while an attacker with its own DHT, a ``P2P`` replica of its daemon and hand-made handlers under the averagers'
prefix runs the attacks of ``AVERAGING_ATTACKS``:

- ``stalling_leader``: declares itself under the group key just ahead of the honest peers, with a new expiration each
  time, accepts every join request and never answers again;
- ``disbanding_leader``: the same, but disbands each group just before its follower would give up, suggesting itself;
- ``unknown_group_parts``: waves of all-reduce streams whose 1 MiB parts name made-up groups, left open;
- ``unfinished_large_parts``: 100 streams per averager, each with a 4.5 MiB part frame sent but for its last byte.

Printed at the end: per attack what was tried, refused, the honest rounds that succeeded meanwhile, and each honest
averager's RSS (its process) at the start, its peak during the attacks and at the end.

    python benchmarks/hostile_peers.py --averaging
    python benchmarks/hostile_peers.py --averaging --attacks unknown_group_parts --scale 0.5
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import AsyncIterator, Dict, List

import psutil
import torch
from hostile_attacks import AttackStats

from hivemind import DHT, get_dht_time
from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.key_manager import GroupKeyManager
from hivemind.p2p import P2P, P2PContext, ServicerBase, framing
from hivemind.p2p.servicer import get_handle_name
from hivemind.proto import averaging_pb2, runtime_pb2

PREFIX = "hostile_avg"
KEY = f"{PREFIX}.0b"
Code = averaging_pb2.MessageCode


class _Leader(ServicerBase):
    """The attacker's rpc_join_group: accept, then stall (``disband=False``) or disband suggesting itself."""

    def __init__(self):
        self.disband = False
        self.requests = 0

    async def rpc_join_group(
        self, request: averaging_pb2.JoinRequest, context: P2PContext
    ) -> AsyncIterator[averaging_pb2.MessageFromLeader]:
        self.requests += 1
        yield averaging_pb2.MessageFromLeader(code=Code.ACCEPTED)
        if not self.disband:
            await asyncio.Event().wait()
        await asyncio.sleep(max(0.0, request.expiration - get_dht_time()) + 0.3)
        yield averaging_pb2.MessageFromLeader(code=Code.GROUP_DISBANDED, suggested_leader=context.local_id.to_bytes())


_Leader.__name__ = "DecentralizedAverager"  # served under the averagers' handler names


@dataclass
class AveragingContext:
    dht: DHT
    p2p: P2P
    leader: _Leader
    honest: List[DecentralizedAverager]
    scale: float
    hold: float

    def count(self, base: int) -> int:
        return max(1, int(base * self.scale))


async def _lead_ahead(ctx: AveragingContext, disband: bool) -> AttackStats:
    """Re-declare the attacker just ahead of the honest declarations for ``hold`` seconds (at least 10)."""
    ctx.leader.disband, ctx.leader.requests = disband, 0
    key_manager = GroupKeyManager(ctx.dht, PREFIX, peer_id=ctx.p2p.peer_id)
    honest_ids = {averager.peer_id for averager in ctx.honest}
    declarations = 0
    until = time.monotonic() + max(10.0, ctx.hold)
    while time.monotonic() < until:
        found = await key_manager.get_averagers(KEY, only_active=True)
        honest = [expiration for peer, expiration in found if peer in honest_ids]
        expiration = max(min(honest, default=get_dht_time() + 1.0) - 0.05, get_dht_time() + 0.3)
        declarations += bool(await key_manager.declare_averager(KEY, ctx.p2p.peer_id, expiration))
        await asyncio.sleep(0.2)
    await key_manager.declare_averager(KEY, ctx.p2p.peer_id, get_dht_time() + 1, looking_for_group=False)
    name = "disbanding_leader" if disband else "stalling_leader"
    return AttackStats(name, tried=ctx.leader.requests, note=f"{declarations} declarations ahead of the honest peers")


async def stalling_leader(ctx: AveragingContext) -> AttackStats:
    return await _lead_ahead(ctx, disband=False)


async def disbanding_leader(ctx: AveragingContext) -> AttackStats:
    return await _lead_ahead(ctx, disband=True)


async def unknown_group_parts(ctx: AveragingContext) -> AttackStats:
    """Waves of 20 streams per honest averager, each a 1 MiB part for a made-up group, left open until answered."""
    stats = AttackStats("unknown_group_parts")
    name = get_handle_name(PREFIX, "DecentralizedAverager", "rpc_aggregate_part")
    release = asyncio.Event()
    codes: Counter = Counter()

    async def one(peer) -> None:
        async def requests():
            part = runtime_pb2.Tensor(buffer=bytes(2**20), dtype="float32", size=[2**18])
            yield averaging_pb2.AveragingData(group_id=os.urandom(20), tensor_part=part)
            await release.wait()

        try:
            stream = await ctx.p2p.iterate_protobuf_handler(peer, name, requests(), averaging_pb2.AveragingData)
            async for reply in stream:
                codes[Code.Name(reply.code)] += 1
                stats.refused += reply.code == Code.BAD_GROUP_ID
                return
        except Exception as e:
            codes[type(e).__name__] += 1

    calls = []
    for _ in range(ctx.count(15)):
        for averager in ctx.honest:
            calls += [asyncio.create_task(one(averager.peer_id)) for _ in range(20)]
        await asyncio.sleep(0.25)
    await asyncio.wait(calls, timeout=30)
    release.set()
    await asyncio.gather(*calls, return_exceptions=True)
    stats.tried = len(calls)
    stats.note = ", ".join(f"{code} x{n}" for code, n in codes.items())
    return stats


async def unfinished_large_parts(ctx: AveragingContext) -> AttackStats:
    """100 raw streams per honest averager, each a frame announcing a 4.5 MiB part with all but its last byte sent,
    held open for ``hold`` seconds (at least 5): each averager receives up to 450 MiB of frames at once."""
    stats = AttackStats("unfinished_large_parts")
    name = get_handle_name(PREFIX, "DecentralizedAverager", "rpc_aggregate_part")
    announced = 4_500_000
    frame = framing.encode_header(framing.MESSAGE_MARKER, announced) + bytes(announced - 1)
    hold = max(5.0, ctx.hold)
    codes: Counter = Counter()

    async def one(peer) -> None:
        _, reader, writer = await ctx.p2p.call_binary_stream_handler(peer, name)
        try:
            writer.write(frame)
            await writer.drain()
            _, error = await framing.receive_protobuf(averaging_pb2.AveragingData, reader)
            codes["refused" if error is not None else "answered"] += 1
            stats.refused += error is not None
        finally:
            writer.close()

    async def held(peer) -> None:
        try:
            await asyncio.wait_for(one(peer), hold)
        except asyncio.TimeoutError:
            codes["held"] += 1
        except Exception as e:
            codes[type(e).__name__] += 1

    calls = [held(averager.peer_id) for averager in ctx.honest for _ in range(ctx.count(100))]
    await asyncio.gather(*calls)
    stats.tried = len(calls)
    stats.note = ", ".join(f"{code} x{n}" for code, n in codes.items())
    return stats


AVERAGING_ATTACKS = {
    "stalling_leader": stalling_leader,
    "disbanding_leader": disbanding_leader,
    "unknown_group_parts": unknown_group_parts,
    "unfinished_large_parts": unfinished_large_parts,
}


@dataclass
class RoundChecker:
    """Runs a step on both honest averagers at once, over and over; counts rounds where both got the average."""

    honest: List[DecentralizedAverager]
    timeout: float
    phase: str = "baseline"
    ok: Counter = field(default_factory=Counter)
    tried: Counter = field(default_factory=Counter)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        round_index = 0
        while not self.stop.is_set():
            phase = self.phase
            values = [float(round_index + 10 * i) for i in range(len(self.honest))]
            for averager, value in zip(self.honest, values):
                with averager.get_tensors() as (tensor,):
                    tensor.fill_(value)
            controls = [averager.step(wait=False, timeout=self.timeout) for averager in self.honest]
            good = True
            for control in controls:
                try:
                    good &= control.result(self.timeout + 5) is not None
                except Exception:
                    good = False
            expected = sum(values) / len(values)
            for averager in self.honest:
                with averager.get_tensors() as (tensor,):
                    good &= bool(torch.allclose(tensor, torch.full_like(tensor, expected)))
            self.tried[phase] += 1
            self.ok[phase] += good
            round_index += 1


def _rss_mib(averager: DecentralizedAverager) -> float:
    try:
        return psutil.Process(averager.pid).memory_info().rss / 2**20
    except psutil.NoSuchProcess:
        return float("nan")


async def run_averaging(args) -> dict:
    dhts = [DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])]
    maddrs = dhts[0].get_visible_maddrs()
    dhts += [DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=maddrs) for _ in range(2)]
    options = dict(prefix=PREFIX, target_group_size=2, min_matchmaking_time=1.0, request_timeout=0.5, start=True)
    honest = [DecentralizedAverager([torch.zeros(4096)], dht, **options) for dht in dhts[1:]]
    p2p = await dhts[0].replicate_p2p()
    leader = _Leader()
    await leader.add_p2p_handlers(p2p, namespace=PREFIX)
    checker = RoundChecker(honest, timeout=args.get_timeout)
    thread = threading.Thread(target=checker.run, daemon=True)
    rss: Dict[str, List[float]] = {"start": [_rss_mib(averager) for averager in honest]}
    peak = list(rss["start"])
    results: List[AttackStats] = []
    ctx = AveragingContext(dhts[0], p2p, leader, honest, args.scale, args.hold)
    started = time.monotonic()
    try:
        thread.start()
        for name in args.attacks:
            checker.phase = name
            task = asyncio.create_task(AVERAGING_ATTACKS[name](ctx))
            while not task.done():
                peak = [max(old, _rss_mib(averager)) for old, averager in zip(peak, honest)]
                await asyncio.wait({task}, timeout=0.1)
            try:
                stats = task.result()
            except Exception as e:  # a bug of the attack itself: report it, go on with the others
                stats = AttackStats(name, note=f"ATTACK ERROR {e!r:.150}")
            await asyncio.sleep(args.settle)
            stats.survived = all(averager.is_alive() for averager in honest)
            results.append(stats)
            print(f"  {name}: tried {stats.tried}, refused {stats.refused} ({time.monotonic() - started:.0f} s)")
        checker.phase = "after"
        await asyncio.sleep(args.settle)
    finally:
        checker.stop.set()
        await asyncio.to_thread(thread.join, args.get_timeout + 10)
        rss["peak"], rss["end"] = peak, [_rss_mib(averager) for averager in honest]
        await p2p.shutdown()
        for averager in honest:
            averager.shutdown()
        for dht in dhts:
            dht.shutdown()
    header = f"{'attack':<22} {'tried':>7} {'refused':>8} {'honest rounds ok':>17}  survived  notes"
    print(header + "\n" + "-" * len(header))
    for stats in results:
        tried, ok = checker.tried[stats.name], checker.ok[stats.name]
        survived = "yes" if stats.survived and tried and tried == ok else "NO"
        rounds = f"{ok}/{tried}"
        print(f"{stats.name:<22} {stats.tried:>7} {stats.refused:>8} {rounds:>17}  {survived:<8}  {stats.note}")
    for i in range(len(honest)):
        print(f"averager {i} RSS, MiB: " + " -> ".join(f"{stage} {rss[stage][i]:.0f}" for stage in rss))
    return dict(
        attacks={s.name: dict(tried=s.tried, refused=s.refused, survived=s.survived, note=s.note) for s in results},
        rounds={phase: (checker.ok[phase], checker.tried[phase]) for phase in checker.tried},
        rss_mib=rss,
    )
