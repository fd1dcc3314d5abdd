"""Checks of the handler names and peer ids passed to ``P2P``, made before anything reaches the daemon."""

from typing import Any, Optional

from google.protobuf.message import Message

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


_NOT_GIVEN = object()


def check_call(peer_id: Any, name: Any, input: Any = _NOT_GIVEN, output_protobuf_type: Any = Message) -> None:
    """Raise TypeError/ValueError for a call that could not reach ``name`` at ``peer_id`` (or send ``input``)."""
    check_peer_id(peer_id)
    check_handle_name(name)
    if input is not _NOT_GIVEN and not (isinstance(input, Message) or hasattr(input, "__aiter__")):
        raise TypeError(
            f"input must be a protobuf message or an async iterator of messages, got {type(input).__name__}"
        )
    _check_message_class("output_protobuf_type", output_protobuf_type)


def check_new_handler(name: Any, handler: Any, input_protobuf_type: Optional[Any] = None) -> None:
    """Raise TypeError/ValueError for a handler that every call would fail to reach or to run."""
    check_handle_name(name)
    if not callable(handler):
        raise TypeError(f"handler must be callable (an async function), got {type(handler).__name__}")
    if input_protobuf_type is not None:
        _check_message_class("input_protobuf_type", input_protobuf_type)


def _check_message_class(name: str, value: Any) -> None:
    """A message class, or a factory of messages (e.g. a partial of a checked subclass); not a message instance."""
    if isinstance(value, Message) or not callable(value):
        hint = f": pass the class {type(value).__name__}, not an instance" if isinstance(value, Message) else ""
        raise TypeError(f"{name} must be a protobuf message class, got {value!r}{hint}")
