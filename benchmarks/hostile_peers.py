"""A hostile peer against a live swarm of honest DHT peers: do honest gets keep working, data intact, memory flat?

The honest peers are ``hivemind.DHT`` processes (each with its own p2pd and an RSASignatureValidator) holding regular
values, a dictionary and a signed record. While a checker thread keeps getting every key through the honest peers and
compares the values with what was stored, an attacker (a third party: its own ``P2P``, the DHT protocol's stubs and
protobufs, raw libp2p streams) runs the attacks of ``ATTACKS`` one after another. Printed at the end: per attack what
was tried, refused (an error answer, store_ok=False, a stream closed by the honest side, a claim that changed
nothing) and whether the swarm survived (every honest get during the attack correct and every peer alive), then each
honest peer's RSS growth (its DHT process plus its p2pd) from after start-up to the end.

    python benchmarks/hostile_peers.py                       # 8 honest peers, every attack
    python benchmarks/hostile_peers.py --peers 4 --scale 0.2 --attacks forged_records node_id_claims

With ``--moe`` the target is an expert server instead (attacks of hostile_moe.py: garbage, huge declared sizes, many
tiny streams, half-open and incomplete streams, cancelled calls, oversized streams; see that file):

    python benchmarks/hostile_peers.py --moe --scale 0.2

With ``--averaging`` the targets are two averagers (attacks of hostile_averaging.py: matchmaking leaders that
re-declare ahead of everyone and stall or disband, all-reduce parts for made-up groups):

    python benchmarks/hostile_peers.py --averaging
"""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import os
import random
import signal
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import psutil

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from hostile_attacks import ATTACKS, AttackContext, AttackStats  # noqa: E402
from hostile_averaging import AVERAGING_ATTACKS, run_averaging  # noqa: E402
from hostile_moe import MOE_ATTACKS, run_moe  # noqa: E402

from hivemind import DHT, get_dht_time  # noqa: E402
from hivemind.dht.crypto import RSASignatureValidator  # noqa: E402
from hivemind.p2p import P2P, PeerID  # noqa: E402
from hivemind.proto import dht_pb2  # noqa: E402
from hivemind.utils.crypto import RSAPrivateKey  # noqa: E402

ECHO_HANDLER = "hostile_peers.echo"  # a stream handler of the honest peers, as averaging or MoE servers have


async def _serve_echo(dht: DHT, node) -> bytes:
    """Runs inside an honest DHT process: serve a protobuf stream handler; return the node id."""

    async def echo(requests, context):
        async for request in requests:
            yield request

    await node.p2p.add_protobuf_handler(ECHO_HANDLER, echo, dht_pb2.PingRequest, stream_input=True, stream_output=True)
    return node.node_id.to_bytes()


async def _holder_of(dht: DHT, node, node_id_bytes: bytes) -> Optional[bytes]:
    """Runs inside an honest DHT process: which peer its routing table maps a node id to."""
    from hivemind.dht.routing import DHTID

    peer = node.protocol.routing_table.get(node_id=DHTID.from_bytes(node_id_bytes))
    return None if peer is None else peer.to_bytes()


@dataclass
class HonestPeer:
    dht: DHT
    validator: RSASignatureValidator
    peer_id: PeerID
    node_id: bytes = b""

    def rss_mib(self) -> float:
        try:
            process = psutil.Process(self.dht.pid)
            return sum(p.memory_info().rss for p in [process, *process.children(recursive=True)]) / 2**20
        except psutil.NoSuchProcess:
            return float("nan")

    def holder_of(self, node_id: bytes) -> Optional[bytes]:
        return self.dht.run_coroutine(_PartialHolder(node_id))

    def alive(self) -> bool:
        return self.dht.is_alive()


class _PartialHolder:
    """A picklable ``coro(dht, node)`` for run_coroutine (closures cannot cross processes)."""

    def __init__(self, node_id: bytes):
        self.node_id = node_id

    def __call__(self, dht, node):
        return _holder_of(dht, node, self.node_id)


@dataclass
class Checker:
    """Gets every honest key through the honest peers in turn and counts correct answers per attack phase."""

    peers: List[HonestPeer]
    expected: Dict[str, Callable[[object], bool]]
    get_timeout: float = 30.0  # s; an honest get that takes longer counts as failed (every wait must be bounded)
    phase: str = "baseline"
    ok: Counter = field(default_factory=Counter)
    tried: Counter = field(default_factory=Counter)
    failures: List[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def check_once(self, index: int) -> None:
        for key, is_correct in self.expected.items():
            if self.stop.is_set():
                return
            phase = self.phase  # per get: a pass over every key may outlast a whole (short) attack
            peer = self.peers[index % len(self.peers)]
            index += 1
            try:
                found = peer.dht.get(key, latest=True, return_future=True).result(timeout=self.get_timeout)
                good = found is not None and is_correct(found.value)
            except TimeoutError:
                found, good = f"no answer in {self.get_timeout:g} s", False
            except Exception as e:  # a dead or stuck honest peer is a failure like a wrong value
                found, good = repr(e), False
            self.tried[phase] += 1
            self.ok[phase] += good
            if not good and len(self.failures) < 20:
                self.failures.append(f"{phase}: get {key!r} via peer {index % len(self.peers)} -> {found!r:.200}")

    async def wait_for_a_get(self, phase: str, timeout: float) -> None:
        """Until a get started in ``phase`` was counted (or ``timeout`` s): a loaded machine may run a whole attack
        while one get of the previous phase is still being answered, which left the attack with no honest get."""
        deadline = time.monotonic() + timeout
        while self.tried[phase] == 0 and not self.stop.is_set() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    def run(self) -> None:
        index = 0
        while not self.stop.is_set():
            self.check_once(index)
            index += 1


def start_swarm(num_peers: int) -> List[HonestPeer]:
    peers: List[HonestPeer] = []
    initial_peers = None
    for _ in range(num_peers):
        validator = RSASignatureValidator(RSAPrivateKey())
        dht = DHT(initial_peers=initial_peers, start=True, record_validators=[validator], wait_timeout=2)
        peers.append(HonestPeer(dht, validator, dht.peer_id))
        initial_peers = initial_peers or [str(m) for m in dht.get_visible_maddrs()]
    for peer in peers:
        peer.node_id = peer.dht.run_coroutine(_serve_echo)
    return peers


def seed_data(peers: List[HonestPeer], num_keys: int) -> Dict[str, Callable[[object], bool]]:
    """Store honest data through the honest peers; returns key -> check of the value a get returns."""
    expiration = get_dht_time() + 3600
    expected: Dict[str, Callable[[object], bool]] = {}
    for i in range(num_keys):
        value = {"index": i, "payload": os.urandom(64)}
        assert peers[i % len(peers)].dht.store(f"honest/{i}", value, expiration), f"seeding honest/{i} failed"
        expected[f"honest/{i}"] = lambda found, value=value: found == value
    subkeys = {f"member{j}": j for j in range(8)}
    for j, (subkey, value) in enumerate(subkeys.items()):
        assert peers[j % len(peers)].dht.store("honest/dict", value, expiration, subkey=subkey)
    expected["honest/dict"] = lambda found: (
        isinstance(found, dict)
        and all(subkey in found and found[subkey].value == value for subkey, value in subkeys.items())
    )
    owner = peers[0].validator.local_public_key
    assert peers[0].dht.store("honest/signed", "v1", get_dht_time() + 1800, subkey=b"slot" + owner)
    expected["honest/signed"] = lambda found: isinstance(found, dict) and found[b"slot" + owner].value == "v2"
    return expected


def print_report(results: List[AttackStats], checker: Checker, peers: List[HonestPeer], rss: Dict[str, list]):
    header = f"{'attack':<26} {'tried':>8} {'refused':>8} {'honest gets ok':>15}  survived  notes"
    print(header)
    print("-" * len(header))
    for stats in results:
        tried, ok = checker.tried[stats.name], checker.ok[stats.name]
        rate = f"{ok}/{tried}" if tried else "-"
        survived = "yes" if stats.survived and tried == ok else "NO"
        print(f"{stats.name:<26} {stats.tried:>8} {stats.refused:>8} {rate:>15}  {survived:<8}  {stats.note}")
    total_tried = sum(v for k, v in checker.tried.items() if k != "baseline")
    total_ok = sum(v for k, v in checker.ok.items() if k != "baseline")
    print(f"honest get success during attacks: {total_ok}/{total_tried} = {100 * total_ok / max(total_tried, 1):.2f}%")
    stages = [stage for stage in rss if stage != "start"]
    print(f"RSS per honest peer (DHT process + p2pd), MiB: after start-up -> {' -> '.join(stages)} (growth)")
    for i in range(len(peers)):
        figures = " -> ".join(f"{rss[stage][i]:6.1f}" for stage in stages)
        print(f"  peer {i}: {rss['start'][i]:6.1f} -> {figures} ({rss['end'][i] - rss['start'][i]:+.1f})")
    for failure in checker.failures:
        print(f"  FAILED GET {failure}")


async def run(args) -> dict:
    started = time.monotonic()
    peers = await asyncio.to_thread(start_swarm, args.peers)
    expected = await asyncio.to_thread(seed_data, peers, args.keys)
    maddrs = [str(m) for peer in peers for m in peer.dht.get_visible_maddrs()]
    attacker = await P2P.create(initial_peers=maddrs, persistent_conn_max_msg_size=64 * 2**20)  # no own limit
    checker = Checker(peers, expected, get_timeout=args.get_timeout)
    rss: Dict[str, list] = {}
    results: List[AttackStats] = []
    thread = threading.Thread(target=checker.run, daemon=True)
    try:
        ctx = AttackContext(attacker, peers, args.scale, random.Random(args.seed), hold=args.hold)
        await ctx.prepare()
        # the signed record gets its second version now, so that the replay attack has an old one to replay
        old_signed = await ctx.fetch_raw("honest/signed")
        owner = peers[0].validator.local_public_key
        await asyncio.to_thread(peers[0].dht.store, "honest/signed", "v2", get_dht_time() + 3000, b"slot" + owner)
        ctx.old_signed = old_signed
        await asyncio.to_thread(checker.check_once, 0)  # everything must be in place before the attacks
        if checker.ok["baseline"] != checker.tried["baseline"]:
            raise RuntimeError(f"honest gets fail before any attack: {checker.failures}")
        rss["start"] = [peer.rss_mib() for peer in peers]
        thread.start()
        for round_index in range(args.rounds):
            for name in args.attacks:
                label = name if args.rounds == 1 else f"{name}#{round_index + 1}"
                checker.phase = label
                try:
                    stats = await ATTACKS[name](ctx)
                except Exception as e:  # a bug of the attack itself: report it, go on with the others
                    stats = AttackStats(name, note=f"ATTACK ERROR {e!r:.150}")
                stats.name = label
                await asyncio.sleep(args.settle)  # let honest gets run right after the attack as well
                await checker.wait_for_a_get(label, 2 * args.get_timeout)
                stats.survived = all(peer.alive() for peer in peers)
                results.append(stats)
                print(f"  {label}: tried {stats.tried}, refused {stats.refused} ({time.monotonic() - started:.0f} s)")
            rss[f"round {round_index + 1}"] = [peer.rss_mib() for peer in peers]
        checker.phase = "after"
        await asyncio.sleep(args.settle)
    finally:
        checker.stop.set()
        if thread.is_alive():
            await asyncio.to_thread(thread.join, args.get_timeout + 1)
        rss["end"] = [peer.rss_mib() for peer in peers]
        await attacker.shutdown()
        for peer in peers:
            await asyncio.to_thread(peer.dht.shutdown)
    print_report(results, checker, peers, rss)
    return dict(
        attacks={s.name: dict(tried=s.tried, refused=s.refused, survived=s.survived, note=s.note) for s in results},
        gets={phase: (checker.ok[phase], checker.tried[phase]) for phase in checker.tried},
        rss_growth_mib=[after - before for before, after in zip(rss["start"], rss["end"])],
        rss_mib=rss,
        failures=checker.failures,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", type=int, default=8, help="honest peers")
    parser.add_argument("--keys", type=int, default=16, help="honest regular keys")
    parser.add_argument("--moe", action="store_true", help="attack an expert server instead of a DHT swarm")
    parser.add_argument("--averaging", action="store_true", help="attack two averagers instead of a DHT swarm")
    parser.add_argument("--attacks", nargs="*", default=None, choices=[*ATTACKS, *MOE_ATTACKS, *AVERAGING_ATTACKS])
    parser.add_argument("--rounds", type=int, default=1, help="run the attacks this many times (RSS after each)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies the number of hostile requests")
    parser.add_argument("--settle", type=float, default=2.0, help="s of honest gets after each attack")
    parser.add_argument("--hold", type=float, default=6.0, help="s to hold half-open streams and 1 GiB headers")
    parser.add_argument("--get-timeout", type=float, default=30.0, help="s before an honest get counts as failed")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 <pid>` shows where a stuck run waits
    kind, known, runner = ("DHT", ATTACKS, run)
    if args.moe:
        kind, known, runner = ("MoE", MOE_ATTACKS, run_moe)
    elif args.averaging:
        kind, known, runner = ("averaging", AVERAGING_ATTACKS, run_averaging)
    args.attacks = list(known) if args.attacks is None else args.attacks
    unknown = [name for name in args.attacks if name not in known]
    if unknown:
        parser.error(f"{unknown} are not {kind} attacks (those are {list(known)})")
    asyncio.run(runner(args))


if __name__ == "__main__":
    main()
