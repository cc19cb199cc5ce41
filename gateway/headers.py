"""Header rewriting between client, gateway and backend (RFC 9110 section 7.6)."""

from __future__ import annotations

from multidict import CIMultiDict, CIMultiDictProxy

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


def _connection_tokens(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> set[str]:
    tokens: set[str] = set()
    for value in headers.getall("Connection", ()):
        tokens.update(t.strip().lower() for t in value.split(",") if t.strip())
    return tokens


def upstream_request_headers(
    headers: CIMultiDictProxy[str] | CIMultiDict[str],
    *,
    keep_authorization: bool,
    client_ip: str | None,
    scheme: str,
    host: str | None,
) -> CIMultiDict[str]:
    drop = _REQUEST_DROP | _connection_tokens(headers)
    if not keep_authorization:
        drop = drop | {"authorization"}
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        lower = name.lower()
        if lower in drop or lower.startswith(IDENTITY_PREFIX):
            continue
        if "_" in lower:
            dashed = lower.replace("_", "-")
            if dashed in _UNDERSCORE_DROP or dashed.startswith(IDENTITY_PREFIX):
                continue
        out.add(name, value)
    if client_ip:
        out["X-Forwarded-For"] = _append(headers, "X-Forwarded-For", client_ip)
    out["X-Forwarded-Proto"] = scheme
    if host:
        out["X-Forwarded-Host"] = host
    out["Via"] = _append(headers, "Via", VIA)
    return out


def client_response_headers(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> CIMultiDict[str]:
    drop = HOP_BY_HOP | _connection_tokens(headers) | {"content-length"}
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        if name.lower() not in drop:
            out.add(name, value)
    out["Via"] = _append(headers, "Via", VIA)
    return out


def _append(headers: CIMultiDictProxy[str] | CIMultiDict[str], name: str, value: str) -> str:
    # Repeated field lines are one comma-separated list (RFC 9110 5.3): keep every hop.
    prior = [v for v in headers.getall(name, ()) if v.strip()]
    return ", ".join([*prior, value])
