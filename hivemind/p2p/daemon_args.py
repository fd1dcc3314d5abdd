"""The p2pd command line built by ``P2P.create``; pure functions, no I/O."""

import re
import warnings
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from hivemind.utils.multiaddr import Multiaddr
from hivemind.utils.value_checks import is_integer, is_number

DHT_MODE_MAPPING: Dict[str, Dict[str, int]] = {
    "auto": {"dht": 1},
    "server": {"dhtServer": 1},
    "client": {"dhtClient": 1},
}
FORCE_REACHABILITY_MAPPING: Dict[str, Dict[str, int]] = {
    "public": {"forceReachabilityPublic": 1},
    "private": {"forceReachabilityPrivate": 1},
}

MaddrLike = Union[str, Multiaddr]


def format_flag(name: str, value: Any) -> str:
    """``-name=value`` with booleans written as 1/0."""
    if isinstance(value, bool):
        value = int(value)
    return f"-{name}={value}"


def refuse_single_maddr(name: str, value: Any) -> None:
    """A single multiaddr where a list is expected was split into characters: p2pd then failed on "/"."""
    if isinstance(value, (str, bytes, Multiaddr)):
        shown = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
        what = type(value).__name__
        raise TypeError(f"{name} must be a list of multiaddrs, got a single {what}: pass [{shown!r}]")


def check_announce_maddrs(announce_maddrs: Optional[Sequence[MaddrLike]]) -> None:
    """Reject announce addresses with port 0: peers could never dial them."""
    refuse_single_maddr("announce_maddrs", announce_maddrs)
    for maddr in announce_maddrs or ():
        parts = str(maddr).split("/")
        for protocol, value in zip(parts, parts[1:]):
            if protocol in ("tcp", "udp") and value.isdigit() and int(value) == 0:
                raise ValueError(f"Announce address {maddr} has port 0: announce_maddrs need the actual port")


def upgrade_quic_draft(host_maddrs: Optional[Sequence[MaddrLike]]) -> Tuple[Optional[List[str]], List[str]]:
    """``host_maddrs`` with each QUIC draft-29 listen address (``.../udp/PORT/quic``) replaced by its QUIC v1 form
    (``.../quic-v1``), and the addresses that were replaced. Our p2pd's libp2p no longer speaks draft-29: given
    next to a TCP address the daemon would silently not listen on it, and given alone it would fail to start."""
    refuse_single_maddr("host_maddrs", host_maddrs)
    if host_maddrs is None:
        return None, []
    upgraded, replaced = [], []
    for maddr in host_maddrs:
        parts = str(maddr).split("/")
        if "quic" in parts:
            parts[parts.index("quic")] = "quic-v1"
            replaced.append(str(maddr))
            upgraded.append("/".join(parts))
        else:
            upgraded.append(str(maddr))
    return upgraded, replaced


def warn_deprecated(**deprecated: Any) -> None:
    """``DeprecationWarning`` for each deprecated ``P2P.create`` option that was set (they have no effect)."""
    for name, value in deprecated.items():
        if value is not None:
            warnings.warn(
                f"P2P.create(..., {name}=...) is deprecated and has no effect", DeprecationWarning, stacklevel=3
            )


def check_max_msg_size(max_msg_size: Any) -> None:
    """``persistent_conn_max_msg_size`` must be a positive int (bytes): p2pd parses an int."""
    if not is_integer(max_msg_size):
        raise TypeError(f"persistent_conn_max_msg_size must be an int (bytes), got {max_msg_size!r}")
    if max_msg_size <= 0:
        raise ValueError(f"persistent_conn_max_msg_size must be a positive number of bytes, got {max_msg_size}")


def build_daemon_args(
    *,
    control_maddr: MaddrLike,
    initial_peers: Optional[Sequence[MaddrLike]] = None,
    announce_maddrs: Optional[Sequence[MaddrLike]] = None,
    auto_nat: bool = True,
    conn_manager: bool = True,
    dht_mode: str = "server",
    force_reachability: Optional[str] = None,
    host_maddrs: Optional[Sequence[MaddrLike]] = ("/ip4/127.0.0.1/tcp/0",),
    identity_path: Optional[str] = None,
    idle_timeout: float = 30,
    nat_port_map: bool = True,
    relay_hop_limit: int = 0,
    tls: bool = True,
    use_auto_relay: bool = False,
    use_ipfs: bool = False,
    use_relay: bool = True,
    max_msg_size: int = 4 * 1024**2,
    no_listen: bool = False,
    trusted_relays: Optional[Sequence[MaddrLike]] = None,
    daemon_flags: Optional[Mapping[str, Any]] = None,
) -> List[str]:
    """Arguments for p2pd, in the order the original hivemind emits them (without the binary path)."""
    check_max_msg_size(max_msg_size)
    if not is_number(idle_timeout):
        raise TypeError(f"idle_timeout must be a number of seconds, got {idle_timeout!r}")
    refuse_single_maddr("initial_peers", initial_peers)
    refuse_single_maddr("trusted_relays", trusted_relays)
    if dht_mode not in DHT_MODE_MAPPING:
        raise ValueError(f"dht_mode must be one of {sorted(DHT_MODE_MAPPING)}, got {dht_mode!r}")
    if force_reachability is not None and force_reachability not in FORCE_REACHABILITY_MAPPING:
        raise ValueError(
            f"force_reachability must be None or one of {sorted(FORCE_REACHABILITY_MAPPING)}, "
            f"got {force_reachability!r}"
        )
    args = [
        format_flag("autoRelay", use_auto_relay),
        format_flag("autonat", auto_nat),
        format_flag("b", bool(initial_peers) or use_ipfs),
        format_flag("connManager", conn_manager),
        format_flag("idleTimeout", f"{idle_timeout}s"),
        format_flag("listen", control_maddr),
        format_flag("natPortMap", nat_port_map),
        format_flag("relay", use_relay),
        format_flag("relayHopLimit", relay_hop_limit),
        format_flag("tls", tls),
        format_flag("persistentConnMaxMsgSize", max_msg_size),
    ]
    args.extend(format_flag(name, value) for name, value in DHT_MODE_MAPPING[dht_mode].items())
    if force_reachability is not None:
        args.extend(format_flag(name, value) for name, value in FORCE_REACHABILITY_MAPPING[force_reachability].items())
    if initial_peers:
        args.append(format_flag("bootstrapPeers", ",".join(str(maddr) for maddr in initial_peers)))
    if host_maddrs:
        args.append(format_flag("hostAddrs", ",".join(str(maddr) for maddr in host_maddrs)))
    if announce_maddrs:
        args.append(format_flag("announceAddrs", ",".join(str(maddr) for maddr in announce_maddrs)))
    if trusted_relays:
        args.append(format_flag("trustedRelays", ",".join(str(maddr) for maddr in trusted_relays)))
    if no_listen:
        args.append(format_flag("noListenAddrs", 1))
    if identity_path is not None:
        args.append(format_flag("id", identity_path))
    args.extend(extra_flags(daemon_flags, already_set=args))
    return args


_FLAG_NAME = re.compile(r"[A-Za-z][A-Za-z0-9]*")


def extra_flags(daemon_flags: Optional[Mapping[str, Any]], already_set: Sequence[str]) -> List[str]:
    """``-name=value`` for each further p2pd flag (e.g. ``{"limitStreamsPerPeer": 256}``; see p2pd/README.md).

    Flags that a ``P2P.create`` option already sets are refused: use that option instead.
    """
    taken = {arg[1:].split("=", 1)[0] for arg in already_set}
    flags = []
    for name, value in (daemon_flags or {}).items():
        if not isinstance(name, str) or not _FLAG_NAME.fullmatch(name):
            raise ValueError(f"daemon_flags: {name!r} is not a p2pd flag name (letters and digits, e.g. 'limitConns')")
        if name in taken:
            raise ValueError(f"daemon_flags: -{name} is already set by a P2P.create option; use that option instead")
        if not isinstance(value, (bool, int, float, str)) or (
            isinstance(value, str) and ("\n" in value or "\0" in value)
        ):
            raise ValueError(f"daemon_flags: the value of -{name} must be a number, a bool or a one-line string")
        flags.append(format_flag(name, value))
    return flags
