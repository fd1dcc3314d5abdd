"""``DHTProtocol.get_stub``: the class-level form every servicer has, plus the per-node form of hivemind 1.1."""

from typing import Any, Callable

from hivemind.p2p import P2P, PeerID, ServicerBase
from hivemind.utils.auth import AuthRole, AuthRPCWrapper


class NodeStubGetter:
    """
    The ``get_stub`` attribute of :class:`~hivemind.dht.protocol.DHTProtocol`, in two forms:

    - ``DHTProtocol.get_stub(p2p, peer, *, namespace=None)`` (on the class, or on an instance with a P2P as first
      argument) is ``ServicerBase.get_stub``: a plain stub whose ``rpc_*`` methods call ``peer`` through ``p2p``.
    - ``protocol.get_stub(peer)`` on a protocol instance, as code written for hivemind 1.1 calls it (e.g. petals'
      ``node.protocol.get_stub(peer_id).rpc_ping(...)``), is a stub to ``peer`` through the node's own P2P. When the
      node has an authorizer, the stub signs every request with it and refuses responses that fail its checks.
    """

    def __get__(self, instance: Any, owner: type) -> Callable:
        class_form = ServicerBase.__dict__["get_stub"].__get__(None, owner)
        if instance is None:
            return class_form

        def get_stub(*args: Any, **kwargs: Any) -> Any:
            if len(args) == 1 and not kwargs and not isinstance(args[0], P2P):
                return _node_stub(instance, class_form, args[0])
            if not args and set(kwargs) == {"peer"}:
                return _node_stub(instance, class_form, kwargs["peer"])
            return class_form(*args, **kwargs)

        get_stub.__doc__ = NodeStubGetter.__doc__
        return get_stub


def _node_stub(protocol: Any, class_form: Callable, peer: PeerID) -> Any:
    stub = class_form(protocol.p2p, peer)
    if protocol.authorizer is None:
        return stub
    return AuthRPCWrapper(stub, AuthRole.CLIENT, protocol.authorizer)
