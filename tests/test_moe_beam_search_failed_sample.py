"""When the search of one sample of a batch fails (its DHT lookup raised), the searches of the batch's other samples
end with the call: they are cancelled, not left to go on looking up prefixes for a result nobody will read."""

import asyncio

import pytest

from hivemind.moe.client.beam_search import _search_many
from hivemind.utils import ValueWithExpiration

PEER = "QmTkFQf2PN5tMxy6pbwcKKWWKt8CMjfNaY4fxKU3V7StGN"
GRID = (16, 16, 16)
FAILING_PREFIX = "ffn.0.0."


class LookupNode:
    """Stands in for the DHT process's node: every prefix has all 16 successors, one lookup fails, each takes 10 ms."""

    def __init__(self):
        self.calls = 0

    async def get_many(self, prefixes, num_workers=None):
        self.calls += 1
        await asyncio.sleep(0.01)
        if FAILING_PREFIX in prefixes:
            raise RuntimeError("the lookup of this prefix failed")
        return {prefix: self._successors(prefix) for prefix in prefixes}

    @staticmethod
    def _successors(prefix):
        remaining = len(GRID) - prefix.count(".")  # coordinates below this prefix's successors
        entries = {c: ValueWithExpiration((f"{prefix}{c}" + ".0" * remaining, PEER), 1e12) for c in range(GRID[0])}
        return ValueWithExpiration(entries, 1e12)


def sample_scores(index):
    """Scores whose best expert is ffn.<a>.<b>.0 with (a, b) = divmod(index, 16): one third-level prefix per sample."""
    first, second = divmod(index, GRID[1])
    return [[-abs(c - first) for c in range(16)], [-abs(c - second) for c in range(16)], [-c for c in range(16)]]


@pytest.mark.timeout(30)
def test_the_other_searches_of_a_batch_end_when_one_sample_fails():
    async def run():
        node = LookupNode()
        with pytest.raises(RuntimeError, match="lookup of this prefix failed"):
            await _search_many(
                None, node, uid_prefix="ffn.", grid_size=GRID, batch_scores=[sample_scores(i) for i in range(200)],
                beam_size=1, negative_caching=False, cache_expiration=0.0, num_workers=4,
            )  # fmt: skip
        calls_at_failure = node.calls
        await asyncio.sleep(0.5)
        assert node.calls == calls_at_failure, "searches of the failed batch went on looking up prefixes"
        assert asyncio.all_tasks() == {asyncio.current_task()}

    asyncio.run(run())
