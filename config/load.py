"""Decode gateway.toml once, check what types alone cannot, and refuse a bad file in one line."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlsplit

import msgspec

from config.model import Config, Route, Upstream
from config.paths import PathPattern, PatternError, parse_pattern

_FREE = "free"
# Served by the gateway itself, so no route may claim them.
RESERVED_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
_DEFAULT_UPSTREAM = "default"


class ConfigError(Exception):
    """A configuration problem, worded as one line that names the key."""


def load_config(path: str | Path, *, default_upstream_url: str | None = None) -> Config:
    """Read and validate a config file; ``default_upstream_url`` overrides upstreams.default."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    return parse_config(raw, source=str(path), default_upstream_url=default_upstream_url)


def parse_config(
    raw: bytes | str, *, source: str = "gateway.toml", default_upstream_url: str | None = None
) -> Config:
    try:
        config = msgspec.toml.decode(raw, type=Config)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{source}: {_describe(exc)}") from None
    except msgspec.DecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    if default_upstream_url is not None:
        upstreams = dict(config.upstreams)
        base = upstreams.get(_DEFAULT_UPSTREAM, Upstream(url=default_upstream_url))
        upstreams[_DEFAULT_UPSTREAM] = msgspec.structs.replace(base, url=default_upstream_url)
        config = msgspec.structs.replace(config, upstreams=upstreams)
    try:
        validate(config)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    return config


def _describe(exc: msgspec.ValidationError) -> str:
    # msgspec says "... - at `$.tiers.free.included_units`"; lead with the key instead.
    text = str(exc)
    match = re.match(r"(?P<msg>.*) - at `\$(?P<at>[^`]*)`$", text)
    if not match:
        return text
    key = match["at"].lstrip(".") or "(top level)"
    key = re.sub(r"\[(\d+)\]", lambda m: f"[{int(m[1]) + 1}]", key)  # 1-based like TOML readers
    return f"{key}: {match['msg']}"


def validate(config: Config) -> None:
    """Cross-field rules: known tiers and upstreams, sane URLs, routes that cannot overlap."""
    if _FREE not in config.tiers:
        raise ConfigError("tiers.free: missing (accounts without a plan use the free tier)")
    free = config.tiers[_FREE]
    if free.allows_overage:
        raise ConfigError("tiers.free.overage_unit_price_usd: the free tier cannot bill overage")
    for name, tier in config.tiers.items():
        if not re.fullmatch(r"[a-z][a-z0-9_-]{0,31}", name):
            raise ConfigError(f"tiers.{name}: tier names are lowercase letters, digits, - and _")
        if tier.monthly_price_usd < 0:
            raise ConfigError(f"tiers.{name}.monthly_price_usd: must be >= 0")
        if tier.overage_unit_price_usd is not None and tier.overage_unit_price_usd < 0:
            raise ConfigError(f"tiers.{name}.overage_unit_price_usd: must be >= 0")
        if tier.max_overage_units is not None and not tier.allows_overage:
            raise ConfigError(f"tiers.{name}.max_overage_units: set without overage_unit_price_usd")
    if _DEFAULT_UPSTREAM not in config.upstreams:
        raise ConfigError("upstreams.default: missing (set it or METERGATE_UPSTREAM_URL)")
    for name, upstream in config.upstreams.items():
        check_url(upstream.url, f"upstreams.{name}.url")
    _validate_auth(config)
    _validate_listen(config.gateway.listen, "gateway.listen")
    _validate_listen(config.admin.listen, "admin.listen")
    for status in config.metering.refund_statuses:
        if not 500 <= status <= 599:
            raise ConfigError(f"metering.refund_statuses: {status} is not a 5xx status")
    _validate_routes(config)


def check_url(url: str, key: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{key}: bad URL {url!r} (expected http://host[:port])")
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        raise ConfigError(f"{key}: bad port in URL {url!r}") from None
    if parts.query or parts.fragment:
        raise ConfigError(f"{key}: URL {url!r} may not carry a query or fragment")


def parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"bad listen address {value!r} (expected host:port)")
    return host.strip("[]"), int(port)


def _validate_listen(listen: str, key: str) -> None:
    try:
        parse_listen(listen)
    except ValueError as exc:
        raise ConfigError(f"{key}: {exc}") from None


def _validate_auth(config: Config) -> None:
    auth = config.auth
    if not auth.algorithms:
        raise ConfigError("auth.algorithms: at least one algorithm is required")
    symmetric = {a.startswith("HS") for a in auth.algorithms}
    if len(symmetric) > 1:
        # Mixing them is how HS/RS key confusion attacks start.
        raise ConfigError("auth.algorithms: do not mix HMAC (HS*) and public-key algorithms")
    if symmetric == {False}:
        if bool(auth.public_key_file) == bool(auth.jwks_url):
            raise ConfigError(
                "auth: public-key algorithms need exactly one of public_key_file or jwks_url"
            )
        if auth.jwks_url:
            check_url(auth.jwks_url, "auth.jwks_url")
    elif auth.public_key_file or auth.jwks_url:
        raise ConfigError("auth: public_key_file/jwks_url need an RS*, ES* or PS* algorithm")


def _validate_routes(config: Config) -> None:
    seen: list[tuple[int, Route, PathPattern]] = []
    for index, route in enumerate(config.routes, start=1):
        key = f"routes[{index}]"
        try:
            pattern = parse_pattern(route.path)
        except PatternError as exc:
            raise ConfigError(f"{key}.path: {exc}") from None
        if route.path in RESERVED_PATHS:
            raise ConfigError(f"{key}.path: {route.path} is the gateway's own endpoint")
        if not route.methods:
            raise ConfigError(f"{key}.methods: at least one method is required")
        if len(set(route.methods)) != len(route.methods):
            raise ConfigError(f"{key}.methods: a method is listed twice")
        if route.upstream not in config.upstreams:
            raise ConfigError(f"{key}.upstream: unknown upstream {route.upstream!r}")
        for tier in route.tiers or ():
            if tier not in config.tiers:
                raise ConfigError(f"{key}.tiers: unknown tier {tier!r}")
        if route.public and route.cost:
            raise ConfigError(f"{key}.cost: a public route cannot cost units (no account)")
        for other_index, other, other_pattern in seen:
            shared = set(route.methods) & set(other.methods)
            if shared and pattern.overlaps(other_pattern):
                what = "duplicates" if pattern.text == other_pattern.text else "overlaps"
                raise ConfigError(
                    f"{key}.path: {route.path!r} {what} routes[{other_index}] "
                    f"{other.path!r} for {'/'.join(sorted(shared))}"
                )
        seen.append((index, route, pattern))
