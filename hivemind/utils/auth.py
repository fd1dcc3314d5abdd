"""Optional request/response authorization for RPCs whose messages carry an ``auth`` field.

A client signs each request with its private key and attaches an application-issued access token; the servicer
checks the token, the signature, the clock and the nonce, and signs its response, which the client checks in turn.
"""

from __future__ import annotations

import functools
import secrets
from abc import ABC, abstractmethod
from enum import Enum
from typing import Any, Optional

from hivemind.proto.auth_pb2 import AccessToken
from hivemind.utils.crypto import RSAPrivateKey, RSAPublicKey
from hivemind.utils.logging import get_logger
from hivemind.utils.timed_storage import TimedStorage, get_dht_time

__all__ = [
    "AuthorizationError",
    "AuthorizerBase",
    "TokenAuthorizerBase",
    "AuthRole",
    "AuthRPCWrapper",
    "MAX_CLIENT_SERVICER_TIME_DIFF",
    "NONCE_EXPIRATION",
]

logger = get_logger(__name__)

MAX_CLIENT_SERVICER_TIME_DIFF = 60.0  # seconds: requests signed further in the past or future are refused
NONCE_EXPIRATION = 180.0  # seconds a servicer remembers a nonce to refuse replays (must exceed 2 x the above)
NONCE_SIZE_BYTES = 8


class AuthorizationError(PermissionError):
    """A request or response failed authorization (bad token, signature, clock, nonce or service key)."""


class AuthorizerBase(ABC):
    """Signs and validates protobuf requests/responses that have an ``auth`` field."""

    @abstractmethod
    async def sign_request(self, request: Any, service_public_key: Optional[RSAPublicKey]) -> None: ...

    @abstractmethod
    async def validate_request(self, request: Any) -> bool: ...

    @abstractmethod
    async def sign_response(self, response: Any, request: Any) -> None: ...

    @abstractmethod
    async def validate_response(self, response: Any, request: Any) -> bool: ...


def _signed_bytes(message: Any) -> bytes:
    """The serialized message with ``auth.signature`` empty: what the signature covers."""
    signature = message.auth.signature
    message.auth.signature = b""
    try:
        return message.SerializeToString()
    finally:
        message.auth.signature = signature


class TokenAuthorizerBase(AuthorizerBase):
    """Authorization with application-issued access tokens (``AccessToken``: username, public key, expiration).

    Subclasses define how a token is obtained (:meth:`get_token`), checked (:meth:`is_token_valid`) and when it is
    renewed (:meth:`does_token_need_refreshing`). Messages are signed with ``local_private_key``, whose public key
    must be the one inside this peer's token.
    """

    def __init__(self, local_private_key: Optional[RSAPrivateKey] = None):
        self._local_private_key = local_private_key if local_private_key is not None else RSAPrivateKey.process_wide()
        self._local_public_key = self._local_private_key.get_public_key()
        self._local_access_token: Optional[AccessToken] = None
        self._recent_nonces: TimedStorage[bytes, None] = TimedStorage()

    @abstractmethod
    async def get_token(self) -> AccessToken:
        """Obtain a fresh access token for this peer (e.g. from an authority server)."""

    @abstractmethod
    def is_token_valid(self, access_token: AccessToken) -> bool:
        """Whether a token presented by another peer is genuine and not expired."""

    @abstractmethod
    def does_token_need_refreshing(self, access_token: AccessToken) -> bool:
        """Whether this peer's own token should be renewed (e.g. it expires soon)."""

    @property
    def local_public_key(self) -> RSAPublicKey:
        return self._local_public_key

    async def ensure_token(self) -> AccessToken:
        """This peer's current token, fetched with :meth:`get_token` when missing or due for renewal."""
        token = self._local_access_token
        if token is None or self.does_token_need_refreshing(token):
            token = await self.get_token()
            if not self.is_token_valid(token):
                raise AuthorizationError(
                    "The token obtained by get_token() is not valid according to is_token_valid()"
                )
            self._local_access_token = token
            logger.debug("Access token refreshed")
        return token

    refresh_token_if_needed = ensure_token  # the name that code written for hivemind 1.1 calls

    def _sign(self, message: Any) -> None:
        message.auth.signature = self._local_private_key.sign(_signed_bytes(message))

    def _check_signed_by_token_owner(self, token: AccessToken, message: Any) -> Optional[str]:
        """None if ``token`` is valid and ``message`` is signed by the key inside it, otherwise the reason."""
        if not self.is_token_valid(token):
            return "the access token is invalid"
        try:
            owner_key = RSAPublicKey.from_bytes(token.public_key)
        except ValueError:
            return "the access token holds a malformed public key"
        if not owner_key.verify(_signed_bytes(message), message.auth.signature):
            return "the signature does not match the public key of the access token"
        return None

    def _check_request_context(self, info: Any) -> Optional[str]:
        """None if the request is addressed to us, fresh and not replayed, otherwise the reason."""
        own_key = self._local_public_key.to_bytes()
        if info.service_public_key not in (b"", own_key):
            return "it was meant for a service with another public key"
        now = get_dht_time()
        if not abs(info.time - now) <= MAX_CLIENT_SERVICER_TIME_DIFF:  # also refuses NaN
            return f"its time {info.time} differs from ours ({now}) by more than {MAX_CLIENT_SERVICER_TIME_DIFF} s"
        if len(info.nonce) != NONCE_SIZE_BYTES:
            return f"its nonce must be {NONCE_SIZE_BYTES} bytes, got {len(info.nonce)}"
        if info.nonce in self._recent_nonces:
            return "its nonce was already used (replayed request)"
        return None

    async def sign_request(self, request: Any, service_public_key: Optional[RSAPublicKey]) -> None:
        token = await self.ensure_token()
        info = request.auth
        info.client_access_token.CopyFrom(token)
        if service_public_key is not None:
            info.service_public_key = service_public_key.to_bytes()
        info.time = get_dht_time()
        info.nonce = secrets.token_bytes(NONCE_SIZE_BYTES)
        self._sign(request)

    async def validate_request(self, request: Any) -> bool:
        # our own token first: subclasses often learn what is_token_valid needs (e.g. the authority's public key)
        # in get_token, so validating before having fetched a token would fail
        await self.ensure_token()
        info = request.auth
        problem = self._check_signed_by_token_owner(info.client_access_token, request)
        problem = problem or self._check_request_context(info)
        if problem is not None:
            logger.debug(f"Request refused: {problem}")
        else:
            self._recent_nonces.store(info.nonce, None, get_dht_time() + NONCE_EXPIRATION)
        return problem is None

    async def sign_response(self, response: Any, request: Any) -> None:
        token = await self.ensure_token()
        info = response.auth
        info.service_access_token.CopyFrom(token)
        info.nonce = request.auth.nonce
        self._sign(response)

    async def validate_response(self, response: Any, request: Any) -> bool:
        await self.ensure_token()  # as in validate_request
        info, requested = response.auth, request.auth
        problem = self._check_signed_by_token_owner(info.service_access_token, response)
        if problem is None and requested.service_public_key not in (b"", info.service_access_token.public_key):
            problem = "it was signed by another service than the one requested"
        if problem is None and info.nonce != requested.nonce:
            problem = "its nonce does not match the request's"
        if problem is not None:
            logger.debug(f"Response refused: {problem}")
        return problem is None


class AuthRole(Enum):
    CLIENT = 0
    SERVICER = 1


class AuthRPCWrapper:
    """Wraps a stub (``AuthRole.CLIENT``) or a servicer (``AuthRole.SERVICER``) so that every ``rpc_*`` call is
    signed and validated by ``authorizer``. Without an authorizer, calls pass through unchanged.

    A client signs a copy of each request (the caller's message is not modified) and raises
    :class:`AuthorizationError` for a response that fails validation; a servicer raises it for a request that fails
    validation, so the caller receives a handler error.
    """

    def __init__(
        self,
        stub: Any,
        role: AuthRole,
        authorizer: Optional[AuthorizerBase],
        service_public_key: Optional[RSAPublicKey] = None,
    ):
        self._stub, self._role, self._authorizer = stub, role, authorizer
        self._service_public_key = service_public_key

    def __getattribute__(self, name: str):
        if not name.startswith("rpc_"):
            return object.__getattribute__(self, name)
        stub, role = object.__getattribute__(self, "_stub"), object.__getattribute__(self, "_role")
        authorizer = object.__getattribute__(self, "_authorizer")
        service_public_key = object.__getattribute__(self, "_service_public_key")
        method = getattr(stub, name)
        if authorizer is None:
            return method

        @functools.wraps(method)
        async def wrapped_rpc(request, *args, **kwargs):
            if role == AuthRole.CLIENT:
                signed_request = type(request)()
                signed_request.CopyFrom(request)
                await authorizer.sign_request(signed_request, service_public_key)
                response = await method(signed_request, *args, **kwargs)
                if not await authorizer.validate_response(response, signed_request):
                    raise AuthorizationError(f"{name}: the response failed authorization")
                return response

            if not await authorizer.validate_request(request):
                raise AuthorizationError(f"{name}: the request failed authorization")
            response = await method(request, *args, **kwargs)
            await authorizer.sign_response(response, request)
            return response

        return wrapped_rpc
