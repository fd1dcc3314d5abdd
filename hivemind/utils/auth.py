"""Optional request/response authorization for RPCs whose messages carry an ``auth`` field (WIRE.md §11).

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

    async def refresh_token_if_needed(self) -> None:
        if self._local_access_token is None or self.does_token_need_refreshing(self._local_access_token):
            self._local_access_token = await self.get_token()
            if not self.is_token_valid(self._local_access_token):
                raise AuthorizationError(
                    "The token obtained by get_token() is not valid according to is_token_valid()"
                )
            logger.debug("Access token refreshed")

    async def sign_request(self, request: Any, service_public_key: Optional[RSAPublicKey]) -> None:
        await self.refresh_token_if_needed()
        auth = request.auth
        auth.client_access_token.CopyFrom(self._local_access_token)
        if service_public_key is not None:
            auth.service_public_key = service_public_key.to_bytes()
        auth.time = get_dht_time()
        auth.nonce = secrets.token_bytes(NONCE_SIZE_BYTES)
        auth.signature = b""
        auth.signature = self._local_private_key.sign(request.SerializeToString())

    async def validate_request(self, request: Any) -> bool:
        await self.refresh_token_if_needed()
        auth = request.auth

        if not self.is_token_valid(auth.client_access_token):
            logger.debug("Request refused: the client's access token is invalid")
            return False
        try:
            client_public_key = RSAPublicKey.from_bytes(auth.client_access_token.public_key)
        except ValueError:
            logger.debug("Request refused: the client's token holds a malformed public key")
            return False
        if not client_public_key.verify(_signed_bytes(request), auth.signature):
            logger.debug("Request refused: the signature does not match the client's public key")
            return False
        if auth.service_public_key and auth.service_public_key != self._local_public_key.to_bytes():
            logger.debug("Request refused: it was meant for a service with another public key")
            return False

        now = get_dht_time()
        if not abs(auth.time - now) <= MAX_CLIENT_SERVICER_TIME_DIFF:  # also refuses NaN
            logger.debug(f"Request refused: its time {auth.time} differs from ours ({now}) by more than allowed")
            return False
        if len(auth.nonce) != NONCE_SIZE_BYTES:
            logger.debug(f"Request refused: nonce must be {NONCE_SIZE_BYTES} bytes, got {len(auth.nonce)}")
            return False
        if auth.nonce in self._recent_nonces:
            logger.debug("Request refused: its nonce was already used (replayed request)")
            return False
        self._recent_nonces.store(auth.nonce, None, now + NONCE_EXPIRATION)
        return True

    async def sign_response(self, response: Any, request: Any) -> None:
        await self.refresh_token_if_needed()
        auth = response.auth
        auth.service_access_token.CopyFrom(self._local_access_token)
        auth.nonce = request.auth.nonce
        auth.signature = b""
        auth.signature = self._local_private_key.sign(response.SerializeToString())

    async def validate_response(self, response: Any, request: Any) -> bool:
        auth = response.auth

        if not self.is_token_valid(auth.service_access_token):
            logger.debug("Response refused: the service's access token is invalid")
            return False
        try:
            service_public_key = RSAPublicKey.from_bytes(auth.service_access_token.public_key)
        except ValueError:
            logger.debug("Response refused: the service's token holds a malformed public key")
            return False
        if not service_public_key.verify(_signed_bytes(response), auth.signature):
            logger.debug("Response refused: the signature does not match the service's public key")
            return False
        expected_service_key = request.auth.service_public_key
        if expected_service_key and auth.service_access_token.public_key != expected_service_key:
            logger.debug("Response refused: it was signed by another service than the one requested")
            return False
        if auth.nonce != request.auth.nonce:
            logger.debug("Response refused: its nonce does not match the request's")
            return False
        return True


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
