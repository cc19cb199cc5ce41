"""Bearer JWT verification shared by the gateway and the admin app.

The verifier returns ``Claims`` or raises one ``AuthError``. Algorithms come from
configuration, never from the token's header; keys are picked by algorithm family so an
RS256 public key can never be used as an HS256 secret.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable

import aiohttp
import jwt

from config.model import Auth
from gateway.claims import Claims
from gateway.errors import AuthError
from gateway.jwks import JwksCache
from gateway.token_cache import TokenCache

__all__ = ["Claims", "TokenVerifier", "issue_token", "token_verifier"]

_REQUIRED = ["exp", "sub"]


class TokenVerifier:
    """Verify bearer tokens; verified tokens are cached (bounded) until they expire."""

    def __init__(
        self,
        auth: Auth,
        *,
        secret: str | None = None,
        jwks: JwksCache | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._auth = auth
        self._algorithms = list(auth.algorithms)
        self._hmac = all(a.startswith("HS") for a in auth.algorithms)
        self._secret = secret
        self._jwks = jwks
        self._public_key: object | None = None
        if not self._hmac and auth.public_key_file:
            with open(auth.public_key_file, "rb") as fh:
                self._public_key = jwt.algorithms.get_default_algorithms()[
                    auth.algorithms[0]
                ].prepare_key(fh.read())
        if self._hmac and not secret:
            raise ValueError("an HMAC algorithm needs a secret")
        self.tokens = TokenCache(auth.token_cache_size, auth.leeway_seconds, clock)
        self._options: jwt.types.Options = {"require": _REQUIRED}

    async def verify(self, token: str) -> Claims:
        cached = self.tokens.get(token)
        if cached is not None:
            return cached
        key = await self._key_for(token)
        claims = self._decode(token, key)
        self.tokens.put(token, claims)
        return claims

    def cached(self, header: str | None) -> Claims | None:
        """The claims of a bearer token verified before and not expired, else None.

        The common case without a coroutine: the proxy awaits ``verify_header`` only when
        this has nothing, which then also answers every refusal. (The proxy asks
        ``tokens`` itself: a native call, as both are compiled.)
        """
        return self.tokens.for_header(header)

    async def verify_header(self, header: str | None) -> Claims:
        if not header:
            raise AuthError("missing bearer token", missing=True)
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthError("Authorization must be 'Bearer <token>'")
        return await self.verify(token.strip())

    async def _key_for(self, token: str) -> object:
        if self._hmac:
            return self._secret
        if self._public_key is not None:
            return self._public_key
        assert self._jwks is not None
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise AuthError(f"malformed token: {exc}") from None
        kid = header.get("kid")
        if not isinstance(kid, str):
            raise AuthError("token has no kid")
        key = await self._jwks.get(kid)
        if key is None:
            raise AuthError("unknown signing key")
        return key

    def _decode(self, token: str, key: object) -> Claims:
        try:
            payload = jwt.decode(
                token,
                key,  # type: ignore[arg-type]
                algorithms=self._algorithms,
                options=self._options,
                audience=self._auth.audience,
                issuer=self._auth.issuer,
                leeway=self._auth.leeway_seconds,
            )
        except jwt.ExpiredSignatureError:
            raise AuthError("token expired") from None
        except jwt.PyJWTError as exc:
            raise AuthError(f"invalid token: {exc}") from None
        sub, exp = payload.get("sub"), payload.get("exp")
        if not isinstance(sub, str) or not sub or len(sub) > 128:
            raise AuthError("invalid token: sub must be a non-empty string")
        if not _is_text(sub):
            # The account id goes into Redis keys and a header to the backend as UTF-8:
            # a lone surrogate cannot be encoded, a control character has no place there.
            raise AuthError("invalid token: sub must be text without control characters")
        if not isinstance(exp, int | float) or isinstance(exp, bool):
            raise AuthError("invalid token: exp must be a number")
        try:
            exp_seconds = float(exp)
        except OverflowError:  # a JSON integer beyond any float: PyJWT compared it as int
            raise AuthError("invalid token: exp out of range") from None
        return Claims(sub=sub, exp=exp_seconds, is_admin=payload.get("role") == "admin")


def _is_text(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return not any(c < " " or c == "\x7f" for c in value)


def issue_token(
    secret: str, sub: str, *, admin: bool = False, ttl: int = 3600, algorithm: str = "HS256"
) -> str:
    """Sign a token for development and tests (``metergate token``)."""
    now = int(time.time())
    claims: dict[str, object] = {"sub": sub, "iat": now, "exp": now + ttl}
    if admin:
        claims["role"] = "admin"
    return jwt.encode(claims, secret, algorithm=algorithm)


@contextlib.asynccontextmanager
async def token_verifier(
    auth: Auth, *, secret: str | None, clock: Callable[[], float] = time.time
) -> AsyncIterator[TokenVerifier]:
    """The verifier the configuration asks for, with its JWKS fetcher when there is one.

    The gateway and the admin app both build theirs here, so they verify exactly alike.
    """
    if not auth.jwks_url:
        yield TokenVerifier(auth, secret=secret, clock=clock)
        return
    async with aiohttp.ClientSession() as session:
        jwks = JwksCache(
            auth.jwks_url,
            session,
            cooldown=auth.jwks_refresh_cooldown_seconds,
            max_age=auth.jwks_cache_seconds,
        )
        yield TokenVerifier(auth, secret=secret, jwks=jwks, clock=clock)
