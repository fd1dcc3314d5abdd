"""Checks of the handler names and peer ids passed to ``P2P``, made before anything reaches the daemon."""

from typing import Any

from hivemind.p2p.p2p_daemon_bindings.datastructures import PeerID

# libp2p's multistream-select negotiates a protocol id (our handler name) in one message of at most 1024 bytes,
# its newline included: a longer name can be registered, but every call to it fails with "stream reset"
MAX_HANDLE_NAME_BYTES = 1023


def check_handle_name(name: Any) -> None:
    """Raise TypeError/ValueError for a handler name that no call could reach."""
    if not isinstance(name, str):
        raise TypeError(f"a handler name must be a str, got {type(name).__name__}: {name!r}")
    size = len(name.encode())
    if size > MAX_HANDLE_NAME_BYTES:
        raise ValueError(
            f"handler name {name[:40]!r}... takes {size} bytes in UTF-8, libp2p allows at most "
            f"{MAX_HANDLE_NAME_BYTES}: use a shorter name (or a shorter prefix/namespace in front of it)"
        )


def check_peer_id(peer_id: Any) -> None:
    if not isinstance(peer_id, PeerID):
        hint = " (convert it with PeerID.from_base58)" if isinstance(peer_id, str) else ""
        raise TypeError(f"peer_id must be a PeerID, got {type(peer_id).__name__}: {peer_id!r}{hint}")


def check_call(peer_id: Any, name: Any) -> None:
    """Raise TypeError/ValueError for a call that could not reach ``name`` at ``peer_id``."""
    check_peer_id(peer_id)
    check_handle_name(name)
