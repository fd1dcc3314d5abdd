import logging
import re

import pytest

from hivemind.utils.limits import increase_file_limit
from hivemind.utils.multiaddr import Multiaddr
from hivemind.utils.networking import choose_ip_address, log_visible_maddrs

PEER = "QmSoLnSGccFuZQJzRadHn95W2CrSFmZuTdDWP8HXaHca9z"


def test_multiaddr_supports_the_documented_api():
    maddr = Multiaddr(f"/ip4/127.0.0.1/tcp/4242/p2p/{PEER}")
    assert Multiaddr(maddr.to_bytes()) == maddr
    assert [protocol.name for protocol in maddr.protocols()] == ["ip4", "tcp", "p2p"]
    assert maddr["p2p"] == PEER and maddr.value_for_protocol("tcp") == "4242"
    assert "tcp" in maddr and "udp" not in maddr
    assert str(maddr.decapsulate(f"/p2p/{PEER}")) == "/ip4/127.0.0.1/tcp/4242"
    assert str(Multiaddr("/ip4/1.2.3.4").encapsulate("/tcp/1")) == "/ip4/1.2.3.4/tcp/1"


@pytest.mark.parametrize(
    "maddrs, expected",
    [
        (["/ip4/127.0.0.1/tcp/1", "/ip4/8.8.8.8/tcp/1", "/ip6/2001:4860::8888/tcp/1"], "8.8.8.8"),
        (["/ip4/127.0.0.1/tcp/1", "/ip6/2001:4860::8888/tcp/1", "/ip4/10.0.0.1/tcp/1"], "2001:4860::8888"),
        (["/ip6/::1/tcp/1", "/ip4/10.0.0.1/tcp/1", "/ip4/127.0.0.1/tcp/1"], "10.0.0.1"),
        (["/ip6/::1/tcp/1", "/ip6/fe80::1/tcp/1"], "::1"),
        (["/ip4/1.1.1.1/tcp/1", "/ip4/8.8.8.8/tcp/1"], "1.1.1.1"),
    ],
)
def test_choose_ip_address_order(maddrs, expected):
    assert choose_ip_address([Multiaddr(m) for m in maddrs]) == expected


def test_choose_ip_address_without_global_preference_and_custom_priority():
    maddrs = ["/ip4/127.0.0.1/tcp/1", "/ip6/2001:4860::8888/tcp/1"]
    assert choose_ip_address(maddrs, prefer_global=False) == "127.0.0.1"
    assert choose_ip_address(maddrs, prefer_global=False, protocol_priority=("ip6", "ip4")) == "2001:4860::8888"


def test_choose_ip_address_without_ips_raises():
    with pytest.raises(ValueError):
        choose_ip_address([Multiaddr(f"/p2p/{PEER}")])


def _logged_lines(caplog, visible, only_p2p):
    hivemind_logger = logging.getLogger("hivemind")
    hivemind_logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="hivemind"):
            log_visible_maddrs(visible, only_p2p=only_p2p)
    finally:
        hivemind_logger.removeHandler(caplog.handler)
    return [re.sub(r"\033\[[0-9;]*m", "", record.getMessage()) for record in caplog.records]


def test_log_visible_maddrs_prints_the_initial_peers_hint(caplog):
    visible = [
        Multiaddr(f"/ip4/127.0.0.1/tcp/4242/p2p/{PEER}"),
        Multiaddr(f"/ip4/192.168.1.5/tcp/4242/p2p/{PEER}"),
        Multiaddr(f"/ip4/192.168.1.5/udp/4242/quic/p2p/{PEER}"),
    ]
    hint, full = _logged_lines(caplog, visible, only_p2p=False)
    assert hint == (
        "Running a DHT instance. To connect other peers to this one, use --initial_peers "
        f"/ip4/127.0.0.1/tcp/4242/p2p/{PEER}"
    )
    assert full == "Full list of visible multiaddresses: " + " ".join(str(m) for m in visible)


def test_log_visible_maddrs_prefers_global_ip(caplog):
    visible = [Multiaddr(f"/ip4/127.0.0.1/tcp/1/p2p/{PEER}"), Multiaddr(f"/ip4/8.8.8.8/tcp/1/p2p/{PEER}")]
    hint, _ = _logged_lines(caplog, visible, only_p2p=False)
    assert hint.endswith(f"--initial_peers /ip4/8.8.8.8/tcp/1/p2p/{PEER}")


def test_log_visible_maddrs_only_p2p(caplog):
    visible = [Multiaddr(f"/ip4/127.0.0.1/tcp/1/p2p/{PEER}"), Multiaddr(f"/ip4/8.8.8.8/tcp/1/p2p/{PEER}")]
    hint, _ = _logged_lines(caplog, visible, only_p2p=True)
    assert hint.endswith(f"--initial_peers /p2p/{PEER}")


def test_increase_file_limit_never_lowers():
    resource = pytest.importorskip("resource")
    before = resource.getrlimit(resource.RLIMIT_NOFILE)
    increase_file_limit(new_soft=16, new_hard=16)
    assert resource.getrlimit(resource.RLIMIT_NOFILE) == before


def test_increase_file_limit_raises_soft_limit():
    resource = pytest.importorskip("resource")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(soft + 1, hard) if hard != resource.RLIM_INFINITY else soft + 1
    increase_file_limit(new_soft=target, new_hard=target)
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] >= target
