"""Canonical request paths and the route table that prices them.

The path the backend receives is exactly the path that was priced: the raw request target
is canonicalized here (percent-encoded unreserved characters decoded, hex upper-cased) and
everything that servers disagree about — encoded slashes and backslashes, dot segments,
empty segments, ';' parameters, double encoding, control or non-ASCII bytes — is refused
with 400 instead of guessed at.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from config.model import Config, Route, Upstream
from config.paths import parse_pattern
from gateway.errors import BadPath

_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
# pchar without ';' (a parameter delimiter to Tomcat, Jetty, Spring) and with '%' and '/'.
_PATH_OK = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,=:@/%]*")
_QUERY_OK = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=:@/?%\[\]|^`{}\"<>\\]*")
_HEX = "0123456789ABCDEFabcdef"


def canonicalize(target: str) -> tuple[str, str]:
    """Split a raw request target into (canonical path, raw query); raise BadPath."""
    if not target.startswith("/"):
        raise BadPath("request target must be an absolute path")
    path, _, query = target.partition("?")
    if not _PATH_OK.fullmatch(path):
        raise BadPath("path has characters that must not appear unencoded")
    if "%" in path:
        path = _decode_unreserved(path)
    segments = path.split("/")
    for index, segment in enumerate(segments[1:], start=1):
        if segment in (".", ".."):
            raise BadPath("dot segments are not allowed")
        if segment == "" and index != len(segments) - 1:
            raise BadPath("empty path segments are not allowed")
    if query and not _QUERY_OK.fullmatch(query):
        raise BadPath("query has characters that must not appear unencoded")
    return path, query


def _decode_unreserved(path: str) -> str:
    out: list[str] = []
    i, n = 0, len(path)
    while i < n:
        ch = path[i]
        if ch != "%":
            out.append(ch)
            i += 1
            continue
        pair = path[i + 1 : i + 3]
        if len(pair) != 2 or pair[0] not in _HEX or pair[1] not in _HEX:
            raise BadPath("malformed percent-encoding")
        byte = int(pair, 16)
        if byte in _UNRESERVED:
            out.append(chr(byte))
        elif byte in (0x2F, 0x5C, 0x3B, 0x25) or byte < 0x20 or byte == 0x7F:
            # Encoded '/', '\', ';', '%' (double encoding) and controls mean different
            # things to different servers: refuse rather than pick one reading.
            raise BadPath("encoded '/', '\\', ';', '%' or control characters are not allowed")
        else:
            out.append("%" + pair.upper())
        i += 3
    return "".join(out)


@dataclass(frozen=True, slots=True)
class PricedRoute:
    """A route as the hot path needs it: everything precomputed."""

    name: str  # the pattern, used as the metrics label
    cost: int
    upstream_name: str
    upstream: Upstream
    public: bool
    tiers: tuple[str, ...] | None
    # The tiers as charge.lua takes them (",pro,enterprise,"; "" for any). Kept on the
    # route: two routes may share a path (name) for different methods and tiers.
    allowed_tiers: str = ""
    # The request body limit: the route's own, else limits.max_request_body_bytes.
    max_body: int = 0


@dataclass(frozen=True, slots=True)
class MethodNotAllowed:
    allowed: tuple[str, ...]


class RouteTable:
    """Static paths resolve with one dict lookup; patterns with a few compiled regexes."""

    def __init__(self, config: Config) -> None:
        self._static: dict[str, dict[str, PricedRoute]] = {}
        self._dynamic: list[tuple[re.Pattern[str], dict[str, PricedRoute]]] = []
        for route in config.routes:
            priced = _priced(route, config)
            pattern = parse_pattern(route.path)
            by_method: dict[str, PricedRoute] = {m: priced for m in route.methods}
            if pattern.is_static:
                self._static.setdefault(route.path, {}).update(by_method)
            else:
                self._dynamic.append((pattern.regex(), by_method))

    def match(self, method: str, path: str) -> PricedRoute | MethodNotAllowed | None:
        by_method = self._static.get(path)
        if by_method is not None:
            route = by_method.get(method)
            if route is not None:
                return route
        # Routes for other methods may share a path (overlap is refused per method only).
        allowed = set(by_method or ())
        for regex, candidate in self._dynamic:
            if regex.fullmatch(path):
                route = candidate.get(method)
                if route is not None:
                    return route
                allowed.update(candidate)
        return MethodNotAllowed(tuple(sorted(allowed))) if allowed else None

    @property
    def routes(self) -> list[PricedRoute]:
        seen: dict[int, PricedRoute] = {}
        for by_method in [*self._static.values(), *(m for _, m in self._dynamic)]:
            for r in by_method.values():
                seen[id(r)] = r
        return list(seen.values())


def _priced(route: Route, config: Config) -> PricedRoute:
    return PricedRoute(
        name=route.path,
        cost=route.cost,
        upstream_name=route.upstream,
        upstream=config.upstreams[route.upstream],
        public=route.public,
        tiers=route.tiers,
        allowed_tiers=f",{','.join(route.tiers)}," if route.tiers else "",
        max_body=(
            config.limits.max_request_body_bytes
            if route.max_body_bytes is None
            else route.max_body_bytes
        ),
    )
