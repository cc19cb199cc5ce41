"""Header rewriting between client, gateway and backend (RFC 9110 section 7.6).

Headers stay the bytes llhttp parsed, from the client's request to the backend's head
and from the backend's answer to the client's: each side is one filtered header block,
with no decoding to text and no multidict per request (that cost ~5 µs a request). Only
values the gateway adds from elsewhere (token claims) are checked for line breaks: llhttp
has already refused CR, LF and obs-fold in what it parsed.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from email.utils import formatdate

from gateway.errors import GatewayError

# RFC 9110 7.6.1 plus the de facto ones every proxy strips (RFC 2616's list, Proxy-Connection).
HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection",
        "Keep-Alive",
        "Proxy-Connection",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
    )
)
IDENTITY_PREFIX = "x-metergate-"
ACCOUNT = "X-Metergate-Account"
TIER = "X-Metergate-Tier"
UNITS = "X-Metergate-Units"
ROLE = "X-Metergate-Role"
VIA = "1.1 metergate"

# Never forwarded upstream: the upstream pool sets Host from the upstream URL and the
# gateway's server answers Expect itself; the forwarding headers are rewritten by the
# gateway, not trusted from clients. `Forwarded` (RFC 7239) is dropped and not set: the
# gateway speaks X-Forwarded-*, and a client's `Forwarded: for=...` would be believed by
# a backend that reads it. The URL and method overrides would let a framework serve
# another route or method than the one priced.
_REQUEST_DROP = HOP_BY_HOP | {
    "host",
    "expect",
    "x-forwarded-host",
    "x-forwarded-proto",
    "forwarded",
    "x-real-ip",
    "x-original-url",
    "x-rewrite-url",
    "x-http-method-override",
    "x-method-override",
    "x-http-method",
}
# CGI and WSGI servers (and nginx, PHP, Rails) read `X_Metergate_Account` as
# HTTP_X_METERGATE_ACCOUNT, the same variable as the trusted `X-Metergate-Account`. So a
# name with '_' is dropped when, read with '-', it names a header the gateway removes,
# sets or rewrites. Other names with '_' pass: some APIs use them and they spoof nothing.
_UNDERSCORE_DROP = _REQUEST_DROP | {"x-forwarded-for", "via", "authorization"}


_HOP_BY_HOP = frozenset(h.encode() for h in HOP_BY_HOP)
_IDENTITY = IDENTITY_PREFIX.encode()
# Content-Length leaves too: the upstream pool frames the body it sends itself.
_REQUEST_DROP_B = frozenset(h.encode() for h in _REQUEST_DROP) | {b"content-length"}
_REQUEST_DROP_NO_AUTH = _REQUEST_DROP_B | {b"authorization"}
_UNDERSCORE_DROP_B = frozenset(h.encode() for h in _UNDERSCORE_DROP)
_RESPONSE_DROP = _HOP_BY_HOP | {b"content-length"}
# The drop set for each ``replace`` set a caller passes (a handful of constants): no union
# of sets per answer.
_response_drops: dict[frozenset[bytes], frozenset[bytes]] = {frozenset(): _RESPONSE_DROP}
_VIA = VIA.encode()

RawHeaders = Sequence[tuple[bytes, bytes]]


class UnsafeHeader(GatewayError):
    """A value the gateway was to send holds a line break: it would forge header lines."""


def encode_value(value: str) -> bytes:
    if "\r" in value or "\n" in value:
        raise UnsafeHeader("a header value contains a line break")
    return value.encode("utf-8", "surrogateescape")


def header_line(name: bytes, value: str) -> bytes:
    """``Name: value\\r\\n`` for a value the gateway adds; UnsafeHeader on a line break."""
    return b"%s: %s\r\n" % (name, encode_value(value))


_VIA_LINE = b"Via: %s\r\n" % _VIA
_PROTO_LINES = {"http": b"X-Forwarded-Proto: http\r\n", "https": b"X-Forwarded-Proto: https\r\n"}


def upstream_request_head(
    headers: RawHeaders,
    *,
    keep_authorization: bool,
    client_ip: bytes | None,
    scheme: str,
    host: str | None,
    added: bytes = b"",
) -> bytes:
    """The header block sent to the backend: the client's headers, less hop-by-hop, spoofed
    identity and override headers, plus the forwarding headers and the ``added`` lines
    (made with ``header_line``)."""
    drop = _REQUEST_DROP_B if keep_authorization else _REQUEST_DROP_NO_AUTH
    out, forwarded_for, via, connection = _request_lines(headers, drop)
    if connection:
        named = _named_by_connection(headers, drop)
        if named:  # rare: the client named more of its fields to drop; filter once more
            out, forwarded_for, via, _ = _request_lines(headers, drop | named)
    if client_ip:
        if forwarded_for is None:
            out.append(b"X-Forwarded-For: %s\r\n" % client_ip)
        else:
            out.append(b"X-Forwarded-For: %s\r\n" % _append(forwarded_for, client_ip))
    out.append(_PROTO_LINES.get(scheme) or header_line(b"X-Forwarded-Proto", scheme))
    if host:
        out.append(header_line(b"X-Forwarded-Host", host))
    out.append(_VIA_LINE if via is None else b"Via: %s\r\n" % _append(via, _VIA))
    out.append(added)
    return b"".join(out)


def _request_lines(
    headers: RawHeaders, drop: frozenset[bytes]
) -> tuple[list[bytes], list[bytes] | None, list[bytes] | None, bool]:
    """The lines kept, the X-Forwarded-For and Via values, and whether Connection was set."""
    out = []
    forwarded_for: list[bytes] | None = None
    via: list[bytes] | None = None
    connection = False
    for name, value in headers:
        lower = name.lower()
        if lower in drop:
            connection = connection or lower == b"connection"
            continue
        if lower.startswith(_IDENTITY):
            continue
        if lower == b"x-forwarded-for":
            forwarded_for = [value] if forwarded_for is None else [*forwarded_for, value]
            continue
        if lower == b"via":
            via = [value] if via is None else [*via, value]
            continue
        if b"_" in lower:
            dashed = lower.replace(b"_", b"-")
            if dashed in _UNDERSCORE_DROP_B or dashed.startswith(_IDENTITY):
                continue
        out.append(b"%s: %s\r\n" % (name, value))
    return out, forwarded_for, via, connection


def client_response_head(
    headers: RawHeaders, added: bytes = b"", *, replace: frozenset[bytes] = frozenset()
) -> bytes:
    """The header block sent to the client: the backend's headers less hop-by-hop ones,
    Content-Length (the gateway frames the body) and the ``replace`` names (lower-case),
    with Via, a Date, and the ``added`` lines."""
    drop = _response_drops.get(replace)
    if drop is None:
        drop = _response_drops[replace] = _RESPONSE_DROP | replace
    out, via, dated, connection = _response_lines(headers, drop)
    if connection:
        named = _named_by_connection(headers, drop)
        if named:  # rare: the backend named more of its fields to drop; filter once more
            out, via, dated, _ = _response_lines(headers, drop | named)
    out.append(_VIA_LINE if via is None else b"Via: %s\r\n" % _append(via, _VIA))
    if not dated:
        out.append(b"Date: %s\r\n" % http_date().encode())
    out.append(added)
    return b"".join(out)


def _response_lines(
    headers: RawHeaders, drop: frozenset[bytes]
) -> tuple[list[bytes], list[bytes] | None, bool, bool]:
    """The lines kept, the Via values, whether a Date was kept and Connection was set."""
    out = []
    via: list[bytes] | None = None
    dated = connection = False
    for name, value in headers:
        lower = name.lower()
        if lower in drop:
            connection = connection or lower == b"connection"
            continue
        if lower == b"via":
            via = [value] if via is None else [*via, value]
            continue
        if lower == b"date":
            dated = True
        out.append(b"%s: %s\r\n" % (name, value))
    return out, via, dated, connection


def _named_by_connection(headers: RawHeaders, drop: frozenset[bytes]) -> set[bytes]:
    """The (lower-case) names of fields in ``headers`` that Connection lists and ``drop``
    does not hold: usually none, as for the common `close` and `keep-alive`, whose block
    then needs no second pass (many clients and servers send one on every message)."""
    tokens: set[bytes] = set()
    for name, value in headers:
        if len(name) == 10 and name.lower() == b"connection":
            for token in value.split(b","):
                token = token.strip().lower()
                if token and token not in drop:
                    tokens.add(token)
    named: set[bytes] = set()
    if tokens:
        for name, _ in headers:
            lower = name.lower()
            if lower in tokens:
                named.add(lower)
    return named


def _append(prior: list[bytes], value: bytes) -> bytes:
    # Repeated field lines are one comma-separated list (RFC 9110 5.3): keep every hop.
    return b", ".join([*(v for v in prior if v.strip()), value])


class _Date:
    """The Date header's value, formatted once a second, not once a response."""

    __slots__ = ("_second", "_value")

    def __init__(self) -> None:
        self._second = 0
        self._value = ""

    def now(self) -> str:
        second = int(time.time())
        if second != self._second:
            self._second = second
            self._value = formatdate(second, usegmt=True)
        return self._value


http_date = _Date().now
