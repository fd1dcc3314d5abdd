"""The attacks of benchmarks/hostile_peers.py: what a third party can send to honest DHT peers.

Every attack uses only what any peer has: its own ``P2P``, the DHT protocol's stubs and protobufs, raw unary payloads
and raw libp2p streams. Each returns how many hostile requests it tried and how many the honest side refused.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass
from typing import Awaitable, Callable, Dict, List, Optional

import msgpack

from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.protocol import DHTProtocol
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord
from hivemind.p2p import P2P
from hivemind.p2p.p2p_daemon_bindings.utils import encode_varint
from hivemind.proto import dht_pb2
from hivemind.utils.crypto import RSAPrivateKey
from hivemind.utils.serializer import MSGPackSerializer
from hivemind.utils.timed_storage import get_dht_time

RPC_TIMEOUT = 10.0  # s, per hostile request
HOLD_SECONDS = 6.0  # how long half-open streams and 1 GiB announcements are held


@dataclass
class AttackStats:
    name: str
    tried: int = 0
    refused: int = 0
    note: str = ""
    survived: bool = True


class AttackContext:
    def __init__(self, attacker: P2P, peers: list, scale: float, rng: random.Random, hold: float = HOLD_SECONDS):
        self.attacker, self.peers, self.scale, self.rng, self.hold = attacker, peers, scale, rng, hold
        self.old_signed: Optional[dht_pb2.FindResult] = None
        self.own_validator = RSASignatureValidator(RSAPrivateKey())

    async def prepare(self) -> None:
        self.stubs = [DHTProtocol.get_stub(self.attacker, peer.peer_id) for peer in self.peers]

    def count(self, n: int) -> int:
        return max(1, int(n * self.scale))

    async def store(self, index: int, items: List[tuple], node_id: bytes = b"") -> Optional[List[bool]]:
        """rpc_store of (key_id bytes, subkey bytes, value bytes, expiration) items; None if an error came back."""
        request = dht_pb2.StoreRequest(peer=dht_pb2.NodeInfo(node_id=node_id))
        for key, subkey, value, expiration in items:
            request.keys.append(key)
            request.subkeys.append(subkey)
            request.values.append(value)
            request.expiration_time.append(expiration)
        try:
            response = await self.stubs[index].rpc_store(request, timeout=RPC_TIMEOUT)
        except Exception:
            return None
        return list(response.store_ok)

    async def fetch_raw(self, key: object) -> dht_pb2.FindResult:
        """The raw FindResult (signatures included) of a DHT key from the first honest peer that has it."""
        key_id = DHTID.generate(source=key).to_bytes()
        for stub in self.stubs:
            response = await stub.rpc_find(dht_pb2.FindRequest(keys=[key_id]), timeout=RPC_TIMEOUT)
            if response.results and response.results[0].type != dht_pb2.NOT_FOUND:
                return response.results[0]
        raise RuntimeError(f"no honest peer has {key!r}")

    async def raw_unary(self, index: int, method: str, payload: bytes) -> bool:
        """Send raw bytes as a unary request; True if the honest side answered with an error (a refusal)."""
        try:
            await asyncio.wait_for(
                self.attacker._client.call_unary_handler(self.peers[index].peer_id, f"DHTProtocol.{method}", payload),
                RPC_TIMEOUT,
            )
            return False
        except asyncio.TimeoutError:
            return False
        except Exception:
            return True

    async def for_all(self, make: Callable[[int], Awaitable[int]]) -> int:
        return sum(await asyncio.gather(*(make(i) for i in range(len(self.peers)))))


def _key(name: str) -> bytes:
    return DHTID.generate(source=name).to_bytes()


def _refused(outcomes: Optional[List[bool]], n: int) -> int:
    return n if outcomes is None else outcomes.count(False)


# ------------------------------------------------------------------------------------------------------- attacks


async def malformed_rpc(ctx: AttackContext) -> AttackStats:
    stats = AttackStats("malformed_rpc")
    valid = dht_pb2.StoreRequest(keys=[_key("x")], subkeys=[b"\xc0"], values=[b"\x01"], expiration_time=[1e9])
    seeds = [valid.SerializeToString(), dht_pb2.FindRequest(keys=[_key("x")]).SerializeToString()]
    payloads = []
    for _ in range(ctx.count(40)):
        kind = ctx.rng.randrange(3)
        if kind == 0:
            payloads.append(ctx.rng.randbytes(ctx.rng.randrange(1, 300)))
        else:
            data = bytearray(ctx.rng.choice(seeds))
            for _ in range(ctx.rng.randrange(1, 5)):
                data[ctx.rng.randrange(len(data))] = ctx.rng.randrange(256)
            payloads.append(bytes(data[: ctx.rng.randrange(1, len(data) + 1)]))

    async def attack(i: int) -> int:
        refused = 0
        for payload in payloads:
            for method in ("rpc_ping", "rpc_store", "rpc_find"):
                refused += await ctx.raw_unary(i, method, payload)
        return refused

    stats.refused = await ctx.for_all(attack)
    stats.tried = len(payloads) * 3 * len(ctx.peers)
    stats.note = "random / mutated protobuf bytes; some happen to be valid requests"
    return stats


async def oversized_rpc(ctx: AttackContext) -> AttackStats:
    stats = AttackStats("oversized_rpc")
    expiration = get_dht_time() + 600

    async def attack(i: int) -> int:
        refused = 0
        many = [(_key(f"many{j}"), b"\xc0", b"\x01", expiration) for j in range(70_000)]  # > MAX_ITEMS_PER_STORE
        refused += _refused(await ctx.store(i, many), len(many)) == len(many)
        huge = [(_key(f"huge{i}"), b"\xc0", b"\xc6" + (6 * 2**20).to_bytes(4, "big") + bytes(6 * 2**20), expiration)]
        refused += _refused(await ctx.store(i, huge), 1)  # above the 4 MiB unary limit of p2pd
        find = dht_pb2.FindRequest(keys=[_key(f"k{j}") for j in range(5000)])
        try:
            await ctx.stubs[i].rpc_find(find, timeout=RPC_TIMEOUT)
        except Exception:
            refused += 1
        return refused

    stats.refused = await ctx.for_all(attack)
    stats.tried = 3 * len(ctx.peers)
    stats.note = "70k-item store, 6 MiB value, 5000-key find"
    return stats


def _forged(ctx: AttackContext, owner_tag: bytes) -> List[tuple]:
    key, subkey = _key("honest/signed"), MSGPackSerializer.dumps(b"slot" + owner_tag)
    expiration = get_dht_time() + 3500  # newer than the honest version
    value = MSGPackSerializer.dumps("evil")
    bad_signature = value + b"[signature:" + bytes(256) + b"]"
    wrong_key = ctx.own_validator.sign_value(
        DHTRecord(key, MSGPackSerializer.dumps(b"slot" + ctx.own_validator.local_public_key), value, expiration)
    )  # signed by the attacker, stored under the honest owner's tag
    unsigned = value
    return [(key, subkey, v, expiration) for v in (bad_signature, wrong_key, unsigned)]


async def forged_records(ctx: AttackContext) -> AttackStats:
    stats = AttackStats("forged_records")
    items = _forged(ctx, ctx.peers[0].validator.local_public_key)

    async def attack(i: int) -> int:
        return sum([_refused(await ctx.store(i, [item]), 1) for item in items * ctx.count(3)])

    stats.refused = await ctx.for_all(attack)
    stats.tried = len(items) * ctx.count(3) * len(ctx.peers)
    stats.note = "bad signature / attacker's key / no signature under the honest owner's tag"
    return stats


async def replayed_requests(ctx: AttackContext) -> AttackStats:
    stats = AttackStats("replayed_requests")
    old = ctx.old_signed
    value = MSGPackSerializer.loads(old.value)  # the dictionary of the first honest version, signatures included
    items = [
        (_key("honest/signed"), MSGPackSerializer.dumps(subkey), item.value, item.expiration_time)
        for subkey, item in value.items()
    ]
    later = [(k, s, v, e + 600) for k, s, v, e in items]  # the same signature with a later expiration

    async def attack(i: int) -> int:
        refused = 0
        for _ in range(ctx.count(5)):
            refused += _refused(await ctx.store(i, items), len(items))
            refused += _refused(await ctx.store(i, later), len(later))
        return refused

    stats.refused = await ctx.for_all(attack)
    stats.tried = 2 * len(items) * ctx.count(5) * len(ctx.peers)
    stats.note = "the owner's superseded signed value, as is and with a later expiration"
    return stats


async def store_flood(ctx: AttackContext) -> AttackStats:
    stats = AttackStats("store_flood")
    expiration = get_dht_time() + 600
    requests, per_request = ctx.count(60), 500

    async def attack(i: int) -> int:
        refused = 0
        for r in range(requests):
            items = [(DHTID.generate().to_bytes(), b"\xc0", MSGPackSerializer.dumps(r), expiration)]
            items *= per_request  # one key, many items: the cheapest request to build, the same work to check
            refused += _refused(await ctx.store(i, items), per_request)
        return refused

    stats.refused = await ctx.for_all(attack)
    stats.tried = requests * per_request * len(ctx.peers)
    stats.note = f"{requests} stores x {per_request} items per peer, back to back"
    return stats


async def _open_and_hold(ctx: AttackContext, index: int, handler: str, prefix: bytes) -> bool:
    """Open a raw stream, send ``prefix``, hold it; True if the honest side closed it within ``ctx.hold`` s."""
    try:
        _, reader, writer = await asyncio.wait_for(
            ctx.attacker.call_binary_stream_handler(ctx.peers[index].peer_id, handler), RPC_TIMEOUT
        )
    except Exception:
        return True  # refused to open
    try:
        writer.write(prefix)
        await writer.drain()
        deadline = asyncio.get_running_loop().time() + ctx.hold
        while asyncio.get_running_loop().time() < deadline:
            chunk = await asyncio.wait_for(reader.read(65536), deadline - asyncio.get_running_loop().time())
            if not chunk:
                return True
        return False
    except (asyncio.TimeoutError, TimeoutError):
        return False
    except Exception:
        return True
    finally:
        writer.close()


async def half_open_streams(ctx: AttackContext) -> AttackStats:
    stats = AttackStats("half_open_streams")
    per_peer = ctx.count(25)
    from hostile_peers import ECHO_HANDLER

    jobs = []
    for i in range(len(ctx.peers)):
        for j in range(per_peer):
            handler = ECHO_HANDLER if j % 2 else "DHTProtocol.rpc_find"
            jobs.append(_open_and_hold(ctx, i, handler, b"\x00\x00\x00" if j % 2 else b"\x85"))
    closed = await asyncio.gather(*jobs)
    stats.tried, stats.refused = len(jobs), sum(closed)
    stats.note = f"partial headers held {ctx.hold:g} s; refused = closed by the honest side"
    return stats


async def frame_1gib(ctx: AttackContext) -> AttackStats:
    stats = AttackStats("frame_1gib")
    from hostile_peers import ECHO_HANDLER

    frame = b"\x00" + (2**30).to_bytes(8, "big") + bytes(4096)
    unary = encode_varint(2**30) + bytes(4096)
    jobs = []
    for i in range(len(ctx.peers)):
        for _ in range(ctx.count(4)):
            jobs.append(_open_and_hold(ctx, i, ECHO_HANDLER, frame))
            jobs.append(_open_and_hold(ctx, i, "DHTProtocol.rpc_store", unary))
    closed = await asyncio.gather(*jobs)
    stats.tried, stats.refused = len(jobs), sum(closed)
    stats.note = f"stream frame / unary varint announcing 1 GiB, then {ctx.hold:g} s of silence"
    return stats


def _deep(depth: int, kind: str) -> bytes:
    if kind == "array":
        return b"\x91" * depth + b"\xc0"
    inner = msgpack.packb(None)
    for _ in range(depth):
        inner = msgpack.packb(msgpack.ExtType(0x40, b"\x91" + inner))
    return inner


async def deep_nesting(ctx: AttackContext) -> AttackStats:
    stats = AttackStats("deep_nesting")
    expiration = get_dht_time() + 600
    values = [_deep(d, kind) for d in (100, 2000, 50_000) for kind in ("array", "tuple")]
    entries = [[MSGPackSerializer.dumps("s"), value, expiration] for value in values]
    dictionary = msgpack.packb(msgpack.ExtType(0x50, msgpack.packb([float("inf"), expiration, entries])))
    items = [(_key(f"deep{n}"), b"\xc0", value, expiration) for n, value in enumerate(values)]
    items += [(_key(f"deepsub{n}"), value, MSGPackSerializer.dumps(1), expiration) for n, value in enumerate(values)]
    items += [(_key("deepdict"), b"", dictionary, expiration)]

    async def attack(i: int) -> int:
        return sum([_refused(await ctx.store(i, [item]), 1) for item in items])

    stats.refused = await ctx.for_all(attack)
    stats.tried = len(items) * len(ctx.peers)
    # a shallow nested value is legitimate: accepting it is fine, decoding it must not crash the honest getter
    stats.note = "values, subkeys, dictionary entries nested 100 / 2000 / 50000 deep"
    return stats


async def node_id_claims(ctx: AttackContext) -> AttackStats:
    stats = AttackStats("node_id_claims")
    peers = ctx.peers

    async def claim(victim: int, impersonated: int) -> None:
        node_info = dht_pb2.NodeInfo(node_id=peers[impersonated].node_id)
        for _ in range(ctx.count(3)):
            try:
                await ctx.stubs[victim].rpc_ping(dht_pb2.PingRequest(peer=node_info), timeout=RPC_TIMEOUT)
                await ctx.stubs[victim].rpc_find(
                    dht_pb2.FindRequest(keys=[_key("honest/0")], peer=node_info), timeout=RPC_TIMEOUT
                )
            except Exception:
                pass

    pairs = [(v, h) for v in range(len(peers)) for h in range(len(peers)) if v != h]
    before = await asyncio.gather(*(asyncio.to_thread(peers[v].holder_of, peers[h].node_id) for v, h in pairs))
    await asyncio.gather(*(claim(v, h) for v, h in pairs))
    await asyncio.sleep(3.0)  # the victims ping the current holders (wait_timeout = 2 s)
    after = await asyncio.gather(*(asyncio.to_thread(peers[v].holder_of, peers[h].node_id) for v, h in pairs))
    attacker_id = ctx.attacker.peer_id.to_bytes()
    hijacked = sum(holder == attacker_id for holder in after)
    lost = sum(b is not None and a is None for b, a in zip(before, after))
    stats.tried = len(pairs)
    stats.refused = stats.tried - hijacked - lost
    stats.note = f"ping+find claiming another honest peer's id; entries taken over: {hijacked}, dropped: {lost}"
    stats.survived = hijacked == 0 and lost == 0
    return stats


async def dictionary_key_inflation(ctx: AttackContext) -> AttackStats:
    stats = AttackStats("dictionary_key_inflation")
    expiration = get_dht_time() + 3500  # outlives the honest entries
    batches, per_batch = ctx.count(20), 1000
    value = MSGPackSerializer.dumps(b"x" * 1024)
    targets = [_key("honest/dict"), _key("attacker/dict")]

    async def attack(i: int) -> int:
        refused = 0
        for b in range(batches):
            key = targets[b % 2]
            items = [(key, MSGPackSerializer.dumps(f"junk{b}-{j}"), value, expiration) for j in range(per_batch)]
            refused += _refused(await ctx.store(i, items), per_batch)
        return refused

    stats.refused = await ctx.for_all(attack)
    stats.tried = batches * per_batch * len(ctx.peers)
    stats.note = "1 KiB subkeys into the honest dictionary and a new one"
    return stats


ATTACKS: Dict[str, Callable[[AttackContext], Awaitable[AttackStats]]] = {
    "malformed_rpc": malformed_rpc,
    "oversized_rpc": oversized_rpc,
    "forged_records": forged_records,
    "replayed_requests": replayed_requests,
    "store_flood": store_flood,
    "half_open_streams": half_open_streams,
    "deep_nesting": deep_nesting,
    "node_id_claims": node_id_claims,
    "frame_1gib": frame_1gib,
    "dictionary_key_inflation": dictionary_key_inflation,  # last: big dictionaries hit the DHT channel hang
}
