"""Typed errors at the gateway's boundaries and the JSON error bodies clients see.

Every error a client can receive has a stable ``code``; README.md lists them.
"""

from __future__ import annotations

from collections.abc import Mapping

import msgspec
from aiohttp import web


class ErrorBody(msgspec.Struct, omit_defaults=True):
    code: str
    message: str
    details: dict[str, object] | None = None


_encode = msgspec.json.Encoder().encode


def error_body(code: str, message: str, details: dict[str, object] | None = None) -> bytes:
    """The JSON body of every error: ``{"error": {"code", "message", "details"?}}``."""
    return _encode({"error": ErrorBody(code, message, details)})


def json_error(
    status: int,
    code: str,
    message: str,
    *,
    headers: Mapping[str, str] | None = None,
    details: dict[str, object] | None = None,
) -> web.Response:
    body = error_body(code, message, details)
    return web.Response(status=status, body=body, content_type="application/json", headers=headers)


class GatewayError(Exception):
    """Base of the errors the gateway maps to a documented status."""


class AuthError(GatewayError):
    """The bearer token is missing or invalid; ``missing`` distinguishes the two for RFC 6750."""

    def __init__(self, message: str, *, missing: bool = False) -> None:
        super().__init__(message)
        self.missing = missing


class QuotaStoreUnavailable(GatewayError):
    """Redis could not be reached or answered too late."""


class BadPath(GatewayError):
    """The request target cannot be canonicalized unambiguously."""


# Here, not in gateway.front where it is raised: a subclass of a builtin other than
# Exception cannot be compiled with mypyc (gateway/compiled.py), so it lives in plain Python.
class ClientGone(ConnectionResetError):
    """The client's connection closed before the exchange ended."""


def bearer_challenge(exc: AuthError) -> tuple[str, str]:
    """The 401's code and RFC 6750 challenge: no error code when there were no credentials."""
    if exc.missing:
        return "missing_token", 'Bearer realm="metergate"'
    return "invalid_token", 'Bearer realm="metergate", error="invalid_token"'


def unauthorized(exc: AuthError) -> web.Response:
    """401 with the RFC 6750 challenge."""
    code, challenge = bearer_challenge(exc)
    return json_error(401, code, str(exc), headers={"WWW-Authenticate": challenge})
