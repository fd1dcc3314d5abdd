"""Churn: a server whose announcements expired while a trainer searched comes back into use once it announces again
(a prefix remembered as empty by negative caching used to hide it for cache_expiration, 300 s by default)."""

import time

import pytest

from hivemind.dht import DHT
from hivemind.moe.client import negative_cache
from hivemind.moe.client.beam_search import MoEBeamSearcher
from hivemind.moe.server.dht_handler import declare_experts
from hivemind.utils.timed_storage import get_dht_time

NEUTRAL_SCORES = [[0.0] * 4, [0.0] * 2]


def search(searcher: MoEBeamSearcher):
    return [expert.uid for expert in searcher.find_best_experts(NEUTRAL_SCORES, beam_size=4)]


def search_until_found(searcher: MoEBeamSearcher, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = search(searcher)
        if found:
            return found
        time.sleep(0.2)
    return []


@pytest.mark.timeout(60)
def test_restarted_server_is_found_again_after_its_prefix_was_negatively_cached(monkeypatch):
    monkeypatch.setattr(negative_cache, "NEGATIVE_RECHECK_PERIOD", 1.0)  # read by the client's (forked) DHT process
    bootstrap = DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    peers = [str(maddr) for maddr in bootstrap.get_visible_maddrs()]
    server_dht = DHT(start=True, initial_peers=peers, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    # a client-mode trainer stores nothing for others: the server's new announcements never reach its own storage
    trainer_dht = DHT(start=True, initial_peers=peers, client_mode=True)
    try:
        searcher = MoEBeamSearcher(trainer_dht, "ffn.", (4, 2))  # negative_caching=True, cache_expiration=300
        expiration = get_dht_time() + 2
        declare_experts(server_dht, ["ffn.3.0"], expiration)
        assert search_until_found(searcher, timeout=10) == ["ffn.3.0"]

        time.sleep(max(0.0, expiration - get_dht_time()) + 0.2)  # the server died: its announcement expires
        assert search(searcher) == []  # nothing under ffn.3.: a None entry is stored there for 300 s
        assert search(searcher) == []  # found in the trainer's local cache

        declare_experts(server_dht, ["ffn.3.0"], get_dht_time() + 60)  # the server is back
        assert search_until_found(searcher, timeout=8) == ["ffn.3.0"]
    finally:
        for dht in (trainer_dht, server_dht, bootstrap):
            dht.shutdown()
