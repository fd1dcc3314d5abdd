"""The MoE part of benchmarks/hostile_peers.py (``--moe``): a hostile peer against a live expert server.

The server (``Server.create``: ffn experts, one handler thread, its own DHT and p2pd) runs in a child process. While a
checker thread keeps calling one expert through ``RemoteExpert`` and compares every output with the first one (the
forward pass of a fixed input is deterministic), an attacker with its own ``P2P`` and the expert RPC stubs runs the
attacks of ``MOE_ATTACKS``: garbage, huge declared sizes, many tiny streams, half-open streams, streams cut short or
abandoned mid-way, floods of cancelled calls, streams over a request's budget. Printed at the end: per attack what was
tried, refused (an error answer or a stream closed by the server) and whether the server survived (every honest call
during the attack correct, the server alive), then the server's RSS (its process tree: server, DHT, p2pd) over time.

    python benchmarks/hostile_peers.py --moe                              # every MoE attack
    python benchmarks/hostile_peers.py --moe --scale 0.2 --attacks half_open_streams cancel_flood
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Dict, List

import psutil
import torch
from hostile_attacks import AttackStats

from hivemind.compression import serialize_torch_tensor
from hivemind.moe.client.expert import RemoteExpert
from hivemind.moe.client.expert_rpc import ConnectionHandler
from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker
from hivemind.moe.expert_uid import ExpertInfo
from hivemind.p2p import P2P, P2PHandlerError, PeerID
from hivemind.p2p.framing import EncodedMessage
from hivemind.p2p.servicer import get_handle_name
from hivemind.proto import runtime_pb2
from hivemind.utils.streaming import split_for_streaming

HIDDEN = 256
MAX_BATCH = 4096  # a whole forward request is 4 MiB: a few dozen half-open ones reach the per-caller limit
UIDS = ["ffn.0", "ffn.1"]
RPC_TIMEOUT = 20.0  # s, per hostile call


@dataclass
class MoEContext:
    attacker: P2P
    server_peer: PeerID
    scale: float
    hold: float

    @property
    def stub(self):
        return ConnectionHandler.get_stub(self.attacker, self.server_peer)

    def count(self, base: int) -> int:
        return max(1, int(base * self.scale))

    async def unary(self, name: str, data: bytes) -> bool:
        """Send raw bytes to a unary RPC; True if the server refused them."""
        handle = get_handle_name(None, "ConnectionHandler", name)
        try:
            await asyncio.wait_for(
                self.attacker._client.call_unary_handler(self.server_peer, handle, data), RPC_TIMEOUT
            )
        except (P2PHandlerError, asyncio.TimeoutError):
            return True
        return False

    async def stream(self, name: str, messages, timeout: float = RPC_TIMEOUT) -> bool:
        """Stream messages to a stream RPC and read the answer; True if it was refused (an error or no answer)."""

        async def call():
            answers = 0
            async for _ in await getattr(self.stub, name)(messages):
                answers += 1
            return answers

        try:
            return await asyncio.wait_for(call(), timeout) == 0
        except (P2PHandlerError, asyncio.TimeoutError):
            return True
        except Exception:  # e.g. the stream was reset by the server after its refusal
            return True


def chunks_of(x: torch.Tensor, uid: str = UIDS[0], chunk_size: int = 64 * 1024) -> List[runtime_pb2.ExpertRequest]:
    serialized = serialize_torch_tensor(x)
    return [runtime_pb2.ExpertRequest(uid=uid, tensors=[c]) for c in split_for_streaming(serialized, chunk_size)]


async def as_stream(messages, stall: float = 0.0):
    for message in messages:
        yield message
    if stall:
        await asyncio.sleep(stall)  # a half-open stream: everything sent, no end-of-stream for a while


async def garbage(ctx: MoEContext) -> AttackStats:
    stats = AttackStats("garbage", note="random bytes and bloated messages to every expert RPC")
    samples = [os.urandom(size) for size in (1, 7, 64, 4096)] + [b"\x12\x00" * 500_000, b"\x0a\xff\xff\xff\xff\x0f"]
    for _ in range(ctx.count(20)):
        for data in samples:
            for name in ("rpc_forward", "rpc_backward", "rpc_info"):
                stats.tried += 1
                stats.refused += await ctx.unary(name, data)
            stats.tried += 1
            stats.refused += await ctx.stream("rpc_forward_stream", as_stream([EncodedMessage([data])]))
    return stats


async def huge_declared_sizes(ctx: MoEContext) -> AttackStats:
    stats = AttackStats("huge_declared_sizes", note="shapes of 2^31 per dim, chunk counts of 2^31, tiny buffers")
    for _ in range(ctx.count(50)):
        head = runtime_pb2.Tensor(dtype="float32", size=[2**31] * 4, buffer=b"\x00" * 64, chunks=2**31 - 1)
        request = runtime_pb2.ExpertRequest(uid=UIDS[0], tensors=[head])
        stats.tried += 2
        stats.refused += await ctx.unary("rpc_forward", request.SerializeToString())
        stats.refused += await ctx.stream("rpc_forward_stream", as_stream([request]))
    return stats


async def many_tiny_streams(ctx: MoEContext) -> AttackStats:
    stats = AttackStats("many_tiny_streams", note="concurrent streams of one empty message each")
    tiny = runtime_pb2.ExpertRequest(uid=UIDS[0])
    for _ in range(ctx.count(10)):
        results = await asyncio.gather(*(ctx.stream("rpc_forward_stream", as_stream([tiny])) for _ in range(100)))
        stats.tried += len(results)
        stats.refused += sum(results)
    return stats


async def half_open_streams(ctx: MoEContext) -> AttackStats:
    stats = AttackStats("half_open_streams", note=f"whole requests that never end, held {ctx.hold:g} s")
    messages = chunks_of(torch.randn(MAX_BATCH, HIDDEN))
    calls = [
        ctx.stream("rpc_forward_stream", as_stream(messages, stall=ctx.hold), timeout=ctx.hold + RPC_TIMEOUT)
        for _ in range(ctx.count(400))
    ]
    results = await asyncio.gather(*calls)
    stats.tried, stats.refused = len(results), sum(results)
    return stats


async def incomplete_streams(ctx: MoEContext) -> AttackStats:
    stats = AttackStats("incomplete_streams", note="streams cut short (end-of-stream) or aborted mid-tensor")
    messages = chunks_of(torch.randn(MAX_BATCH, HIDDEN), chunk_size=16 * 1024)

    async def aborted():
        for message in messages[: len(messages) // 2]:
            yield message
        raise RuntimeError("the caller dies mid-stream")  # (not a ConnectionError: those do not abort the call)

    for _ in range(ctx.count(50)):
        stats.tried += 2
        stats.refused += await ctx.stream("rpc_forward_stream", as_stream(messages[: len(messages) // 2]))
        stats.refused += await ctx.stream("rpc_backward_stream", aborted())
    return stats


async def cancel_flood(ctx: MoEContext) -> AttackStats:
    stats = AttackStats("cancel_flood", note="valid full-batch calls cancelled right after they are sent")
    request = runtime_pb2.ExpertRequest(uid=UIDS[0], tensors=[serialize_torch_tensor(torch.randn(64, HIDDEN))])
    for _ in range(ctx.count(20)):
        calls = [asyncio.create_task(ctx.stub.rpc_forward(request)) for _ in range(50)]
        await asyncio.sleep(0.005)
        for call in calls:
            call.cancel()
        results = await asyncio.gather(*calls, return_exceptions=True)
        stats.tried += len(calls)
        stats.refused += sum(isinstance(result, BaseException) for result in results)
    return stats


async def oversized_streams(ctx: MoEContext) -> AttackStats:
    stats = AttackStats("oversized_streams", note="streams of 4x the largest valid request, in chunks")
    messages = chunks_of(torch.randn(4 * MAX_BATCH, HIDDEN), chunk_size=1024**2)
    for _ in range(ctx.count(10)):
        results = await asyncio.gather(*(ctx.stream("rpc_forward_stream", as_stream(messages)) for _ in range(10)))
        stats.tried += len(results)
        stats.refused += sum(results)
    return stats


MOE_ATTACKS: Dict[str, Callable[[MoEContext], Awaitable[AttackStats]]] = {
    attack.__name__: attack
    for attack in (
        garbage,
        huge_declared_sizes,
        many_tiny_streams,
        half_open_streams,
        incomplete_streams,
        cancel_flood,
        oversized_streams,
    )
}


def _serve(connection, parent_end) -> None:
    from hivemind.moe.server import Server

    parent_end.close()  # inherited by fork: without closing it, the parent's exit would not reach recv() below
    torch.set_num_threads(1)
    server = Server.create(
        expert_uids=UIDS, expert_cls="ffn", hidden_dim=HIDDEN, max_batch_size=MAX_BATCH, optim_cls=None,
        host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True, device="cpu",
    )  # fmt: skip
    connection.send((server.dht.peer_id.to_bytes(), [str(m) for m in server.dht.get_visible_maddrs()]))
    try:
        connection.recv()  # until told to stop (or EOF: the benchmark went away)
    except EOFError:
        pass
    server.shutdown()


def server_rss_mib(pid: int) -> float:
    try:
        process = psutil.Process(pid)
        return sum(p.memory_info().rss for p in [process, *process.children(recursive=True)]) / 2**20
    except psutil.NoSuchProcess:
        return float("nan")


@dataclass
class Caller:
    """Calls the expert with a fixed input through RemoteExpert and counts correct answers per attack phase."""

    expert: RemoteExpert
    timeout: float
    phase: str = "baseline"
    ok: Counter = field(default_factory=Counter)
    tried: Counter = field(default_factory=Counter)
    failures: List[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self):
        self.x = torch.randn(4, HIDDEN, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            self.expected = self.expert(self.x)

    def run(self) -> None:
        while not self.stop.is_set():
            phase, started = self.phase, time.monotonic()
            try:
                with torch.no_grad():
                    output = self.expert(self.x)
                good = torch.allclose(output, self.expected) and time.monotonic() - started < self.timeout
                problem = f"took {time.monotonic() - started:.1f} s or differs"
            except Exception as e:
                good, problem = False, repr(e)
            self.tried[phase] += 1
            self.ok[phase] += good
            if not good and len(self.failures) < 20:
                self.failures.append(f"{phase}: {problem:.200}")
            time.sleep(0.02)


async def run_moe(args) -> dict:
    here, there = mp.get_context("fork").Pipe()
    server = mp.get_context("fork").Process(target=_serve, args=(there, here))  # not a daemon: it starts a DHT process
    server.start()
    there.close()  # (the child's end: EOF here if the server dies before it starts)
    try:
        peer_bytes, maddrs = await asyncio.to_thread(here.recv)
    except EOFError:
        raise RuntimeError(f"the expert server exited with code {server.exitcode} before it started") from None
    server_peer = PeerID(peer_bytes)
    attacker = await P2P.create(initial_peers=maddrs, persistent_conn_max_msg_size=64 * 2**20)
    # RemoteExpert runs its calls in the RemoteExpertWorker's event loop: its P2P must live in that loop
    honest = await asyncio.wrap_future(RemoteExpertWorker.run_coroutine(P2P.create(initial_peers=maddrs), True))
    caller = await asyncio.to_thread(Caller, RemoteExpert(ExpertInfo(UIDS[1], server_peer), honest), args.get_timeout)
    thread = threading.Thread(target=caller.run, daemon=True)
    rss = {"start": server_rss_mib(server.pid)}
    peak: Dict[str, float] = {}  # the highest RSS sampled during each attack

    def sample_peaks():
        while not caller.stop.wait(0.1):
            phase = caller.phase
            peak[phase] = max(peak.get(phase, 0.0), server_rss_mib(server.pid))

    sampler = threading.Thread(target=sample_peaks, daemon=True)
    results: List[AttackStats] = []
    ctx = MoEContext(attacker, server_peer, args.scale, args.hold)
    started = time.monotonic()
    try:
        thread.start()
        sampler.start()
        for name in args.attacks:
            caller.phase = name
            try:
                stats = await MOE_ATTACKS[name](ctx)
            except Exception as e:  # a bug of the attack itself: report it, go on with the others
                stats = AttackStats(name, note=f"ATTACK ERROR {e!r:.150}")
            await asyncio.sleep(args.settle)
            stats.survived = server.is_alive()
            rss[name] = server_rss_mib(server.pid)
            results.append(stats)
            print(f"  {name}: tried {stats.tried}, refused {stats.refused} ({time.monotonic() - started:.0f} s)")
        caller.phase = "after"
        await asyncio.sleep(args.settle)
    finally:
        caller.stop.set()
        await asyncio.to_thread(thread.join, args.get_timeout + 1)
        await asyncio.to_thread(sampler.join, 5)
        rss["end"] = server_rss_mib(server.pid)
        await attacker.shutdown()
        await asyncio.wrap_future(RemoteExpertWorker.run_coroutine(honest.shutdown(), True))
        here.send("stop")
        await asyncio.to_thread(server.join, 30)
    header = f"{'attack':<22} {'tried':>7} {'refused':>8} {'honest calls ok':>16}  survived  notes"
    print(header + "\n" + "-" * len(header))
    for stats in results:
        tried, ok = caller.tried[stats.name], caller.ok[stats.name]
        survived = "yes" if stats.survived and tried == ok else "NO"
        print(
            f"{stats.name:<22} {stats.tried:>7} {stats.refused:>8} {f'{ok}/{tried}':>16}  {survived:<8}  {stats.note}"
        )
    print("server RSS (server + DHT + p2pd), MiB: " + " -> ".join(f"{stage} {mib:.0f}" for stage, mib in rss.items()))
    print("peak during each attack, MiB: " + ", ".join(f"{name} {peak.get(name, float('nan')):.0f}" for name in rss))
    for failure in caller.failures:
        print(f"  FAILED CALL {failure}")
    return dict(
        attacks={s.name: dict(tried=s.tried, refused=s.refused, survived=s.survived, note=s.note) for s in results},
        calls={phase: (caller.ok[phase], caller.tried[phase]) for phase in caller.tried},
        rss_mib=rss,
        peak_rss_mib=peak,
        failures=caller.failures,
    )
