"""`hivemind-dht` of one implementation as the bootstrap peer for DHT peers of the other."""

import pickle
import re
import time

import pytest

from .conftest import DIRECTIONS, ORIGINAL, OURS

pytestmark = [pytest.mark.interop, pytest.mark.timeout(90)]

CLI_ARGS = ["--host_maddrs", "/ip4/127.0.0.1/tcp/0", "--refresh_period", "1"]


@pytest.mark.parametrize(
    "bootstrap, joiner", DIRECTIONS, ids=["original-cli-bootstraps-ours", "ours-cli-bootstraps-original"]
)
def test_hivemind_dht_bootstraps_peers_of_the_other_implementation(cli_tools, module_peers, bootstrap, joiner):
    tool = cli_tools(bootstrap, CLI_ARGS)
    driver = module_peers(joiner, f"cli-{joiner}")  # starts while the tool starts
    initial_peers = tool.initial_peers(timeout=30)
    assert initial_peers and all(re.search(r"^/ip4/127\.0\.0\.1/tcp/\d+/p2p/\w+$", m) for m in initial_peers)

    first = driver.call("dht_create", initial_peers=initial_peers, timeout=60)
    second = driver.call("dht_create", initial_peers=initial_peers, timeout=60)
    key, value, expiration = f"cli-{bootstrap}", ("joined", bootstrap), time.time() + 60
    assert driver.call(
        "dht_store",
        handle=first["handle"],
        key_pkl=pickle.dumps(key).hex(),
        value_pkl=pickle.dumps(value).hex(),
        expiration=expiration,
    )
    found = driver.call("dht_get", handle=second["handle"], key_pkl=pickle.dumps(key).hex(), latest=True)
    assert found["found"] and pickle.loads(bytes.fromhex(found["value_pkl"])) == value
    assert found["expiration"] == expiration

    # the tool sees both joiners in its routing table and holds the key (it is one of the nearest replicas)
    start = len(tool.lines)
    tool.wait_for(
        re.compile(r"^.*\[INFO\] 3 DHT nodes \(including this one\) are in the local routing table $"), 20, start
    )
    tool.wait_for(re.compile(r"\[INFO\] Local storage contains 1 keys$"), 20, start)

    for handle in (first["handle"], second["handle"]):
        driver.call("dht_shutdown", handle=handle)
    assert tool.stop() == 0
    assert any(re.search(r"\[INFO\] Caught signal 2 \(\w+\), shutting down$", line) for line in tool.lines)


def _normalized_info_lines(lines):
    """INFO messages without timestamps, addresses and numbers: the shape users and scripts rely on."""
    shapes = []
    for line in lines:
        match = re.match(r"^\w{3} \d{2} \d{2}:\d{2}:\d{2}\.\d{3} \[INFO\] (.*)$", line)
        if match:
            message = re.sub(r"/ip4/\S+/p2p/\w+", "<maddr>", match.group(1))
            shapes.append(re.sub(r"\d+", "<n>", message))
    return sorted(set(shapes))


def test_hivemind_dht_prints_the_same_lines_as_the_original(cli_tools):
    tools = {side: cli_tools(side, CLI_ARGS) for side in (ORIGINAL, OURS)}
    for tool in tools.values():
        tool.initial_peers(timeout=30)
        first_report = tool.wait_for(re.compile(r"Local storage contains \d+ keys$"), 20)
        tool.wait_for(re.compile(r"Local storage contains \d+ keys$"), 20, tool.lines.index(first_report.string) + 1)
    statuses = {side: tool.stop() for side, tool in tools.items()}
    assert statuses == {ORIGINAL: 0, OURS: 0}
    shapes = {side: _normalized_info_lines(tool.lines) for side, tool in tools.items()}
    assert shapes[OURS] == shapes[ORIGINAL]
