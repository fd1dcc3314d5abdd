import asyncio
from datetime import datetime, timedelta, timezone

import pytest

from hivemind.proto import dht_pb2
from hivemind.proto.auth_pb2 import AccessToken
from hivemind.utils.auth import AuthorizationError, AuthRole, AuthRPCWrapper, TokenAuthorizerBase
from hivemind.utils.crypto import RSAPrivateKey
from hivemind.utils.timed_storage import get_dht_time


class Authority:
    """Issues tokens signed by its own key, as an application's auth server would."""

    def __init__(self):
        self.private_key = RSAPrivateKey()

    @staticmethod
    def _token_bytes(token: AccessToken) -> bytes:
        return f"{token.username} {token.public_key} {token.expiration_time}".encode()

    def issue(self, username: str, public_key: bytes, lifetime: timedelta = timedelta(minutes=5)) -> AccessToken:
        expiration = (datetime.now(timezone.utc) + lifetime).isoformat()
        token = AccessToken(username=username, public_key=public_key, expiration_time=expiration)
        token.signature = self.private_key.sign(self._token_bytes(token))
        return token

    def is_valid(self, token: AccessToken) -> bool:
        if not self.private_key.get_public_key().verify(self._token_bytes(token), token.signature):
            return False
        return datetime.fromisoformat(token.expiration_time) > datetime.now(timezone.utc)


class MockAuthorizer(TokenAuthorizerBase):
    def __init__(self, authority: Authority, username: str, private_key: RSAPrivateKey = None):
        super().__init__(private_key if private_key is not None else RSAPrivateKey())
        self.authority, self.username, self.tokens_issued = authority, username, 0

    async def get_token(self) -> AccessToken:
        self.tokens_issued += 1
        return self.authority.issue(self.username, self.local_public_key.to_bytes())

    def is_token_valid(self, access_token: AccessToken) -> bool:
        return self.authority.is_valid(access_token)

    def does_token_need_refreshing(self, access_token: AccessToken) -> bool:
        return datetime.fromisoformat(access_token.expiration_time) < datetime.now(timezone.utc) + timedelta(minutes=1)


@pytest.fixture(scope="module")
def authority():
    return Authority()


@pytest.fixture(scope="module")
def keys():
    return RSAPrivateKey(), RSAPrivateKey()


@pytest.fixture
def client(authority, keys):
    return MockAuthorizer(authority, "client", keys[0])


@pytest.fixture
def servicer(authority, keys):
    return MockAuthorizer(authority, "servicer", keys[1])


def _wire(message):
    """What the other side parses: a round trip through bytes."""
    return type(message).FromString(message.SerializeToString())


async def test_signed_request_is_valid(client, servicer):
    request = dht_pb2.PingRequest(validate=True)
    await client.sign_request(request, servicer.local_public_key)
    assert request.auth.client_access_token.username == "client"
    assert len(request.auth.nonce) == 8 and abs(request.auth.time - get_dht_time()) < 5
    assert await servicer.validate_request(_wire(request))


async def test_replayed_request_is_refused(client, servicer):
    request = dht_pb2.PingRequest()
    await client.sign_request(request, None)
    assert await servicer.validate_request(_wire(request))
    assert not await servicer.validate_request(_wire(request))


@pytest.mark.parametrize("skew", [-61, 61])
async def test_clock_skew_is_refused(client, servicer, skew):
    request = dht_pb2.PingRequest()
    await client.sign_request(request, None)
    request.auth.time += skew
    request.auth.signature = b""
    request.auth.signature = client._local_private_key.sign(request.SerializeToString())  # a correctly signed lie
    assert not await servicer.validate_request(_wire(request))


async def test_tampered_request_is_refused(client, servicer):
    request = dht_pb2.PingRequest(validate=False)
    await client.sign_request(request, None)
    request.validate = True
    assert not await servicer.validate_request(_wire(request))


async def test_request_for_another_service_is_refused(client, servicer):
    request = dht_pb2.PingRequest()
    await client.sign_request(request, RSAPrivateKey().get_public_key())
    assert not await servicer.validate_request(_wire(request))


async def test_token_from_another_authority_is_refused(servicer):
    outsider = MockAuthorizer(Authority(), "outsider")
    request = dht_pb2.PingRequest()
    await outsider.sign_request(request, None)
    assert not await servicer.validate_request(_wire(request))


async def test_stolen_token_with_another_key_is_refused(client, servicer):
    thief = MockAuthorizer(client.authority, "thief")
    await client.ensure_token()
    thief._local_access_token = client._local_access_token  # token of the client, signature of the thief
    request = dht_pb2.PingRequest()
    await thief.sign_request(request, None)
    assert not await servicer.validate_request(_wire(request))


async def test_signed_response_is_valid_and_bound_to_the_request(client, servicer):
    request = dht_pb2.PingRequest()
    await client.sign_request(request, None)
    response = dht_pb2.PingResponse(dht_time=1.0)
    await servicer.sign_response(response, _wire(request))
    assert await client.validate_response(_wire(response), request)

    other_request = dht_pb2.PingRequest()
    await client.sign_request(other_request, None)
    assert not await client.validate_response(_wire(response), other_request)  # nonce mismatch


async def test_tampered_response_is_refused(client, servicer):
    request = dht_pb2.PingRequest()
    await client.sign_request(request, None)
    response = dht_pb2.PingResponse(dht_time=1.0)
    await servicer.sign_response(response, request)
    response.dht_time = 2.0
    assert not await client.validate_response(_wire(response), request)


async def test_token_is_fetched_once_and_reused(client):
    for _ in range(3):
        await client.sign_request(dht_pb2.PingRequest(), None)
    assert client.tokens_issued == 1


class PingServicer:
    def __init__(self):
        self.requests = []

    async def rpc_ping(self, request: dht_pb2.PingRequest, context) -> dht_pb2.PingResponse:
        self.requests.append(request)
        return dht_pb2.PingResponse(dht_time=get_dht_time(), available=request.validate)


class LoopbackStub:
    """Delivers calls to a (wrapped) servicer through serialization, like the network would."""

    def __init__(self, servicer, tamper=None):
        self.servicer, self.tamper = servicer, tamper

    async def rpc_ping(self, request, timeout=None):
        received = _wire(request)
        if self.tamper is not None:
            self.tamper(received)
        response = await asyncio.wait_for(self.servicer.rpc_ping(received, None), timeout)
        return _wire(response)


async def test_auth_rpc_wrapper_end_to_end(client, servicer):
    implementation = PingServicer()
    wrapped_servicer = AuthRPCWrapper(implementation, AuthRole.SERVICER, servicer)
    stub = AuthRPCWrapper(LoopbackStub(wrapped_servicer), AuthRole.CLIENT, client, servicer.local_public_key)
    request = dht_pb2.PingRequest(validate=True)
    response = await stub.rpc_ping(request, timeout=5)
    assert response.available and response.auth.service_access_token.username == "servicer"
    assert implementation.requests[0].auth.client_access_token.username == "client"
    assert not request.HasField("auth")  # the caller's message is left untouched


async def test_auth_rpc_wrapper_refuses_tampered_request(client, servicer):
    implementation = PingServicer()
    wrapped_servicer = AuthRPCWrapper(implementation, AuthRole.SERVICER, servicer)

    def tamper(request):
        request.validate = not request.validate

    stub = AuthRPCWrapper(LoopbackStub(wrapped_servicer, tamper), AuthRole.CLIENT, client)
    with pytest.raises(AuthorizationError, match="request"):
        await stub.rpc_ping(dht_pb2.PingRequest(), timeout=5)
    assert implementation.requests == []


async def test_auth_rpc_wrapper_refuses_unsigned_response(client):
    stub = AuthRPCWrapper(LoopbackStub(PingServicer()), AuthRole.CLIENT, client)
    with pytest.raises(AuthorizationError, match="response"):
        await stub.rpc_ping(dht_pb2.PingRequest(), timeout=5)


async def test_auth_rpc_wrapper_without_authorizer_passes_through():
    implementation = PingServicer()
    stub = AuthRPCWrapper(LoopbackStub(implementation), AuthRole.CLIENT, None)
    response = await stub.rpc_ping(dht_pb2.PingRequest(validate=True))
    assert response.available and not response.HasField("auth")


class LateKeyAuthorizer(MockAuthorizer):
    """Learns the authority's public key in get_token(), a common pattern in applications written for hivemind 1.1:
    is_token_valid() cannot work before the authorizer has fetched its own token."""

    async def get_token(self) -> AccessToken:
        self.authority_public_key = self.authority.private_key.get_public_key()
        return await super().get_token()

    def is_token_valid(self, access_token: AccessToken) -> bool:
        return self.authority_public_key.verify(Authority._token_bytes(access_token), access_token.signature)


async def test_request_validated_before_fetching_own_token_refreshes_it_first(authority, keys):
    client, servicer = LateKeyAuthorizer(authority, "client", keys[0]), LateKeyAuthorizer(authority, "servicer")
    request = dht_pb2.PingRequest()
    await client.sign_request(request, None)
    assert await servicer.validate_request(_wire(request))
    assert servicer.tokens_issued == 1


async def test_response_validated_before_fetching_own_token_refreshes_it_first(authority, keys):
    signer, servicer = LateKeyAuthorizer(authority, "signer", keys[0]), LateKeyAuthorizer(authority, "servicer")
    request = dht_pb2.PingRequest()
    await signer.sign_request(request, None)
    response = dht_pb2.PingResponse()
    await servicer.sign_response(response, request)
    fresh_client = LateKeyAuthorizer(authority, "client")
    assert await fresh_client.validate_response(_wire(response), request)
    assert fresh_client.tokens_issued == 1


async def test_refresh_token_if_needed_fetches_a_token_once(authority):
    authorizer = LateKeyAuthorizer(authority, "peer")
    await authorizer.refresh_token_if_needed()
    await authorizer.refresh_token_if_needed()
    assert authorizer.tokens_issued == 1 and authorizer.is_token_valid(await authorizer.ensure_token())
