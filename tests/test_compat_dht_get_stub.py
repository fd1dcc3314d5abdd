"""DHTProtocol.get_stub in both forms, between real daemons: the class-level form every servicer has and
``protocol.get_stub(peer)``, which code written for hivemind 1.1 calls (petals pings peers that way)."""

import pytest

from hivemind.dht.protocol import DHTProtocol
from hivemind.dht.routing import DHTID
from hivemind.p2p import P2P, P2PDaemonError, P2PHandlerError
from hivemind.p2p.servicer import StubBase
from hivemind.proto import dht_pb2
from hivemind.proto.auth_pb2 import AccessToken
from hivemind.utils.auth import AuthRPCWrapper, TokenAuthorizerBase
from hivemind.utils.crypto import RSAPrivateKey

AUTHORITY_KEY = RSAPrivateKey()


def _token_bytes(token: AccessToken) -> bytes:
    return b"%s|%s" % (token.username.encode(), token.public_key)


class SwarmAuthorizer(TokenAuthorizerBase):
    """Tokens signed by one authority key; counts the requests it validated."""

    def __init__(self, username: str):
        super().__init__(RSAPrivateKey())
        self.username, self.validated_requests = username, 0

    async def get_token(self) -> AccessToken:
        token = AccessToken(username=self.username, public_key=self.local_public_key.to_bytes(), expiration_time="-")
        token.signature = AUTHORITY_KEY.sign(_token_bytes(token))
        return token

    def is_token_valid(self, access_token: AccessToken) -> bool:
        return AUTHORITY_KEY.get_public_key().verify(_token_bytes(access_token), access_token.signature)

    def does_token_need_refreshing(self, access_token: AccessToken) -> bool:
        return False

    async def validate_request(self, request) -> bool:
        valid = await super().validate_request(request)
        self.validated_requests += valid
        return valid


@pytest.fixture
async def protocols(request):
    """(server, caller) DHTProtocols on two daemons; with authorizers when parametrized with True."""
    with_auth = getattr(request, "param", False)
    p2p_a = await P2P.create()
    p2p_b = await P2P.create(initial_peers=await p2p_a.get_visible_maddrs())
    created = [p2p_a, p2p_b]
    try:
        server = await DHTProtocol.create(
            p2p_a,
            DHTID.generate(),
            20,
            5,
            5,
            wait_timeout=5,
            authorizer=SwarmAuthorizer("server") if with_auth else None,
        )
        created.append(server)
        caller = await DHTProtocol.create(
            p2p_b,
            DHTID.generate(),
            20,
            5,
            5,
            wait_timeout=5,
            authorizer=SwarmAuthorizer("caller") if with_auth else None,
        )
        created.append(caller)
        yield server, caller
    finally:
        for item in reversed(created):
            await item.shutdown()


@pytest.mark.timeout(30)
async def test_class_level_get_stub_takes_p2p_peer_and_namespace(protocols):
    server, caller = protocols
    stub = DHTProtocol.get_stub(caller.p2p, server.p2p.peer_id)
    assert isinstance(stub, StubBase)
    response = await stub.rpc_ping(dht_pb2.PingRequest(peer=caller.node_info), timeout=5)
    assert response.peer.node_id == server.node_id.to_bytes()
    with pytest.raises(P2PDaemonError):  # nothing is served under that namespace
        await DHTProtocol.get_stub(caller.p2p, server.p2p.peer_id, namespace="elsewhere").rpc_ping(
            dht_pb2.PingRequest(), timeout=5
        )


@pytest.mark.timeout(30)
async def test_instance_get_stub_takes_just_the_peer_id(protocols):
    server, caller = protocols
    for stub in (caller.get_stub(server.p2p.peer_id), caller.get_stub(peer=server.p2p.peer_id)):
        response = await stub.rpc_ping(dht_pb2.PingRequest(peer=caller.node_info), timeout=5)
        assert response.peer.node_id == server.node_id.to_bytes()


@pytest.mark.timeout(30)
async def test_instance_get_stub_with_p2p_and_peer_is_the_class_level_form(protocols):
    server, caller = protocols
    stub = caller.get_stub(caller.p2p, server.p2p.peer_id, namespace=None)
    assert isinstance(stub, StubBase)
    assert (await stub.rpc_ping(dht_pb2.PingRequest(), timeout=5)).peer.node_id == server.node_id.to_bytes()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("protocols", [True], indirect=True)
async def test_instance_get_stub_signs_requests_with_the_node_authorizer(protocols):
    server, caller = protocols
    stub = caller.get_stub(server.p2p.peer_id)
    assert isinstance(stub, AuthRPCWrapper)
    response = await stub.rpc_ping(dht_pb2.PingRequest(peer=caller.node_info), timeout=5)
    assert response.peer.node_id == server.node_id.to_bytes()
    assert server.authorizer.validated_requests == 1
    assert response.auth.service_access_token.username == "server"  # the signed response was checked by the stub


@pytest.mark.timeout(30)
@pytest.mark.parametrize("protocols", [True], indirect=True)
async def test_unsigned_request_from_the_class_level_stub_is_refused_by_an_authorizing_node(protocols):
    server, caller = protocols
    with pytest.raises(P2PHandlerError):
        await DHTProtocol.get_stub(caller.p2p, server.p2p.peer_id).rpc_ping(dht_pb2.PingRequest(), timeout=5)
    assert server.authorizer.validated_requests == 0
