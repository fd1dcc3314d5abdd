"""Helpers for choosing and announcing this peer's addresses."""

from __future__ import annotations

import ipaddress
from typing import Iterable, Sequence, Union

from hivemind.utils.logging import TextStyle, get_logger
from hivemind.utils.multiaddr import Multiaddr, peer_id_of

__all__ = ["LOCALHOST", "choose_ip_address", "initial_peers_hint", "log_visible_maddrs"]

logger = get_logger(__name__)

LOCALHOST = "127.0.0.1"  # the IPv4 loopback address


def _is_global(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip.split("%", 1)[0]).is_global  # strip an IPv6 zone like fe80::1%eth0
    except ValueError:
        return False


def choose_ip_address(
    maddrs: Sequence[Union[Multiaddr, str]],
    prefer_global: bool = True,
    protocol_priority: Sequence[str] = ("ip4", "ip6"),
) -> str:
    """Pick one IP to advertise: the first globally routable address of the first protocol in ``protocol_priority``,
    then the next protocol, then non-global addresses in the same protocol order (list order within each class).

    :param prefer_global: if False, global and non-global addresses are treated alike
    :raises ValueError: if none of the multiaddrs contains an address of the given protocols
    """
    parsed = [Multiaddr(str(maddr)) for maddr in maddrs]
    globality_passes = (True, False) if prefer_global else (None,)
    for need_global in globality_passes:
        for protocol in protocol_priority:
            for maddr in parsed:
                if protocol not in maddr:
                    continue
                ip = maddr.value_for_protocol(protocol)
                if need_global is None or _is_global(ip) == need_global:
                    return ip
    raise ValueError(f"None of the multiaddrs {[str(m) for m in parsed]} has an address of {list(protocol_priority)}")


def _select_initial_peers(visible_maddrs: Sequence[Multiaddr], only_p2p: bool) -> Iterable[str]:
    if only_p2p:
        peer_ids = (peer_id_of(maddr) for maddr in visible_maddrs)  # in a relay address, not the relay's id
        return dict.fromkeys(f"/p2p/{peer_id}" for peer_id in peer_ids if peer_id is not None)
    with_ip = [maddr for maddr in visible_maddrs if "ip4" in Multiaddr(str(maddr)) or "ip6" in Multiaddr(str(maddr))]
    if not with_ip:
        return [str(maddr) for maddr in visible_maddrs]
    preferred_ip = choose_ip_address(with_ip)
    return [str(maddr) for maddr in visible_maddrs if preferred_ip in str(maddr)]


def log_visible_maddrs(visible_maddrs: Sequence[Multiaddr], only_p2p: bool) -> None:
    """Log the two start-up lines of hivemind-dht: the ``--initial_peers ...`` hint and all visible multiaddrs.

    :param only_p2p: print only the unique ``/p2p/<peer id>`` parts (for peers bootstrapping through IPFS)
    """
    hint = initial_peers_hint(visible_maddrs, only_p2p)
    logger.info(f"Running a DHT instance. To connect other peers to this one, use {hint}")
    logger.info(f"Full list of visible multiaddresses: {' '.join(str(maddr) for maddr in visible_maddrs)}")


def initial_peers_hint(visible_maddrs: Sequence[Multiaddr], only_p2p: bool = False) -> str:
    """``--initial_peers A1 A2 ...`` for a tool's start-up line: the addresses of one IP (a public one if there is
    one), or only the ``/p2p/<peer id>`` parts; highlighted on terminals."""
    return _highlight("--initial_peers " + " ".join(_select_initial_peers(visible_maddrs, only_p2p)))


def _highlight(text: str) -> str:
    """Bold blue on terminals (or with HIVEMIND_COLORS=1), plain text otherwise."""
    return TextStyle.BOLD + TextStyle.BLUE + text + TextStyle.RESET
