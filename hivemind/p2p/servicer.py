"""``ServicerBase``: each ``rpc_*`` coroutine of a subclass becomes a p2p handler; ``StubBase`` calls them."""

import asyncio
import collections.abc
import inspect
import typing
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Dict, List, Optional, Tuple, Type

from google.protobuf.message import Message

from hivemind.p2p.p2p_daemon import P2P
from hivemind.p2p.p2p_daemon_bindings.datastructures import PeerID
from hivemind.utils.asyncio import as_aiter

RPC_PREFIX = "rpc_"
_STREAM_ORIGINS = (collections.abc.AsyncIterator, collections.abc.AsyncIterable)


@dataclass(frozen=True)
class RPCHandler:
    """What the stub and the registration need to know about one ``rpc_*`` method."""

    name: str  # the method name, rpc_...
    request_type: type
    response_type: type
    stream_input: bool
    stream_output: bool


def get_handle_name(namespace: Optional[str], class_name: str, method_name: str) -> str:
    """The libp2p protocol id of a handler: ``[namespace::]ClassName.rpc_x``."""
    handle_name = f"{class_name}.{method_name}"
    return handle_name if namespace is None else f"{namespace}::{handle_name}"


def _unwrap_stream(annotation: Any) -> Tuple[Any, bool]:
    """``(message_type, is_stream)`` for ``T``, ``AsyncIterator[T]`` or ``AsyncIterable[T]``."""
    if typing.get_origin(annotation) in _STREAM_ORIGINS:
        (item_type,) = typing.get_args(annotation)
        return item_type, True
    return annotation, False


def inspect_rpc_method(owner: type, method_name: str, method: Callable) -> RPCHandler:
    """Describe one ``rpc_*`` method from its signature; ``ValueError`` if it cannot be served."""
    qualified_name = f"{owner.__name__}.{method_name}"
    if not inspect.iscoroutinefunction(method) and not inspect.isasyncgenfunction(method):
        raise ValueError(f"{qualified_name} must be an async method (async def)")
    parameters = list(inspect.signature(method).parameters.values())
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) < 3:
        raise ValueError(f"{qualified_name} must take (self, request, context), got {len(positional)} positional args")
    try:
        hints = typing.get_type_hints(method)
    except Exception as e:
        raise ValueError(f"Cannot resolve the type annotations of {qualified_name}: {e!r}") from e
    request_param = positional[1].name
    if request_param not in hints or "return" not in hints:
        raise ValueError(
            f"{qualified_name} needs type annotations for the request parameter ({request_param!r}) and the "
            "return value, e.g. `async def rpc_x(self, request: Req, context: P2PContext) -> Resp`"
        )
    request_type, stream_input = _unwrap_stream(hints[request_param])
    response_type, stream_output = _unwrap_stream(hints["return"])
    return RPCHandler(method_name, request_type, response_type, stream_input, stream_output)


class StubBase:
    """Calls the ``rpc_*`` handlers of one remote peer; subclasses get one method per handler."""

    def __init__(self, p2p: P2P, peer: PeerID, namespace: Optional[str]) -> None:
        self._p2p = p2p
        self._peer = peer
        self._namespace = namespace


class ServicerBase:
    """Base class for RPC services: ``async def rpc_<name>(self, request, context: P2PContext) -> response``.

    Annotate the request and return types; ``AsyncIterator[T]``/``AsyncIterable[T]`` marks a streaming side.
    ``await servicer.add_p2p_handlers(p2p)`` serves them, ``Servicer.get_stub(p2p, peer_id)`` calls them.
    """

    @classmethod
    def _get_rpc_handlers(cls) -> List[RPCHandler]:
        if "_rpc_handlers_cache" not in cls.__dict__:
            handlers = []
            for attribute, function in inspect.getmembers(cls, inspect.isfunction):
                if attribute.startswith(RPC_PREFIX):
                    handlers.append(inspect_rpc_method(cls, attribute, function))
            cls._rpc_handlers_cache = handlers
        return cls.__dict__["_rpc_handlers_cache"]

    @classmethod
    def _get_stub_type(cls) -> Type[StubBase]:
        # cached per class: a subclass gets its own stub that uses its own class name
        if "_stub_type_cache" not in cls.__dict__:
            methods: Dict[str, Callable] = {}
            for handler in cls._get_rpc_handlers():
                methods[handler.name] = _make_stub_method(cls.__name__, handler)
            cls._stub_type_cache = type(f"{cls.__name__}Stub", (StubBase,), methods)
        return cls.__dict__["_stub_type_cache"]

    @classmethod
    def get_stub(cls, p2p: P2P, peer: PeerID, *, namespace: Optional[str] = None) -> StubBase:
        """An object whose ``rpc_*`` methods call this servicer's handlers at ``peer``."""
        return cls._get_stub_type()(p2p, peer, namespace)

    async def add_p2p_handlers(
        self, p2p: P2P, wrapper: Optional[object] = None, *, namespace: Optional[str] = None, balanced: bool = False
    ) -> None:
        """Serve every ``rpc_*`` method through ``p2p``; ``wrapper`` (if given) supplies the implementations."""
        implementation = wrapper if wrapper is not None else self
        class_name = type(self).__name__
        await asyncio.gather(
            *(
                p2p.add_protobuf_handler(
                    get_handle_name(namespace, class_name, handler.name),
                    getattr(implementation, handler.name),
                    handler.request_type,
                    stream_input=handler.stream_input,
                    stream_output=handler.stream_output,
                    balanced=balanced,
                )
                for handler in self._get_rpc_handlers()
            )
        )

    async def remove_p2p_handlers(self, p2p: P2P, *, namespace: Optional[str] = None) -> None:
        """Stop serving the handlers added by ``add_p2p_handlers`` with the same ``namespace``."""
        class_name = type(self).__name__
        await asyncio.gather(
            *(
                p2p.remove_protobuf_handler(
                    get_handle_name(namespace, class_name, handler.name),
                    stream_input=handler.stream_input,
                    stream_output=handler.stream_output,
                )
                for handler in self._get_rpc_handlers()
            )
        )


def _make_stub_method(class_name: str, handler: RPCHandler) -> Callable:
    if handler.stream_output:

        async def call_streaming(stub: StubBase, input: Any, timeout: Optional[float] = None) -> AsyncIterator[Any]:
            if timeout is not None:
                raise ValueError(f"{handler.name} returns a stream; timeout= is supported for unary outputs only")
            remote_name = get_handle_name(stub._namespace, class_name, handler.name)
            return await stub._p2p.iterate_protobuf_handler(stub._peer, remote_name, input, handler.response_type)

        call_streaming.__name__ = handler.name
        return call_streaming

    async def call_unary(stub: StubBase, input: Any, timeout: Optional[float] = None) -> Any:
        remote_name = get_handle_name(stub._namespace, class_name, handler.name)
        if handler.stream_input and isinstance(input, Message):
            input = as_aiter(input)  # a stream-input handler is served as a stream even for a single message
        # timeout None: a unary call still waits at most p2p.unary_call_timeout; P2PTimeoutError names peer and rpc
        return await stub._p2p.call_protobuf_handler(
            stub._peer, remote_name, input, handler.response_type, timeout=timeout
        )

    call_unary.__name__ = handler.name
    return call_unary
