"""The checks of benchmarks/chaos_dht.py (every get judged against the stores acknowledged before it), and helpers."""

import bisect
import collections
from typing import Optional

SUBKEYS = ("a", "b", "c")  # the subkeys of the dictionary keys, shared by all peers
KEY_KINDS = {"k": "plain", "d": "dictionary", "s": "sentinel (stored once)"}


class Checker:
    """Judges every get against the acknowledged stores (see the module docstring)."""

    def __init__(self, chaos, num_replicas: int = 5):
        from hivemind.dht.routing import DHTID

        self.chaos, self.num_replicas, self.key_id = chaos, num_replicas, lambda key: int(DHTID.generate(source=key))
        stores = chaos.attempts + [op for op in chaos.ops if "value" in op]
        self.attempts = {(op["key"], op["subkey"], op["value"]): op["expiration"] for op in stores}
        self.acked = collections.defaultdict(list)  # (key, subkey) -> acknowledged stores, in order of their end
        for op in sorted(chaos.ops, key=lambda op: op["end"]):
            if op["op"].startswith("store") and op["status"] == "ok" and op["result"]:
                self.acked[op["key"], op["subkey"]].append(op)
        self.outcomes = collections.Counter()
        self.examples = collections.defaultdict(list)

    def frozen(self, peer, start: float, end: float) -> bool:
        return any(s < end and e > start for s, e in peer.freezes)

    def replicas(self, key: str, store: dict) -> list:
        up = [
            p
            for p in self.chaos.peers.values()
            if p.ready_at is not None and p.ready_at <= store["end"] and p.gone_at > store["start"]
        ]
        key_id = self.key_id(key)
        return sorted(up, key=lambda p: p.node_id ^ key_id)[: self.num_replicas]

    def explained(self, store: dict, get: dict) -> bool:
        getter = self.chaos.peers[get["label"]]
        if self.frozen(getter, get["start"], get["end"]):
            return True
        return all(
            p.gone_at < get["end"]
            or self.frozen(p, store["start"], store["end"])
            or self.frozen(p, get["start"], get["end"])
            for p in self.replicas(store["key"], store)
        )

    def expected(self, key: str, subkey, get: dict) -> Optional[dict]:
        stores = self.acked.get((key, subkey), [])
        # a get may join a search of its peer that began up to 1 s earlier (REUSE_GET_TOLERANCE of DHTNode)
        stores = stores[: bisect.bisect_left([op["end"] for op in stores], get["start"] - 1.0)]
        live = [op for op in stores if op["expiration"] > get["end"] + 1.0]
        return max(live, key=lambda op: op["expiration"], default=None)

    def judge_slot(self, get: dict, key: str, subkey, found, partial: bool = False) -> None:
        expected = self.expected(key, subkey, get)
        kind = "get(latest=True)" if get["op"] == "get_latest" else "get(latest=False)"
        if found is not None:
            value, expiration = found
            if expiration < get["start"] - 0.01:
                outcome = "EXPIRED value returned"
            elif self.attempts.get((key, subkey, value)) != expiration:
                outcome = "CORRUPT value returned"
            elif expected is not None and expiration < expected["expiration"]:
                if get["op"] == "get":
                    outcome = "older value (latest=False)"
                else:
                    outcome = "stale, explained" if self.explained(expected, get) else "STALE"
            else:
                outcome = "ok, found"
        elif expected is not None and get["op"] == "get" and partial:
            outcome = "older value (latest=False)"  # a dictionary without this subkey: the first one found is kept
        elif expected is not None:
            outcome = "lost, explained" if self.explained(expected, get) else "LOST"
        else:
            outcome = "ok, nothing to find"
        self.outcomes[kind, KEY_KINDS[key[0]], outcome] += 1
        if outcome.isupper() or outcome.split(" ")[0].isupper():
            self.examples[outcome].append(
                f"{get['label']} {kind} {key}/{subkey} at {get['start']:.1f}: got {found}, newest acknowledged "
                f"{None if expected is None else (expected['value'], expected['expiration'], expected['end'])}"
            )

    def run(self) -> None:
        for op in self.chaos.ops:
            if not op["op"].startswith("get") or op["status"] != "ok":
                continue
            key, result = op["key"], op["result"]
            if not key.startswith("d"):
                self.judge_slot(op, key, None, result)
            else:
                for subkey in SUBKEYS:
                    self.judge_slot(
                        op, key, subkey, None if result is None else result.get(subkey), result is not None
                    )
