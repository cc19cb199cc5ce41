"""Decode gateway.toml once, check what types alone cannot, and refuse a bad file in one line."""

from __future__ import annotations

import ipaddress
import re
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import msgspec

from config.model import Auth, Config, Route, Tier, Upstream
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
        raise ConfigError(_one_line(f"{path}: cannot read: {exc.strerror or exc}")) from None
    return parse_config(raw, source=str(path), default_upstream_url=default_upstream_url)


def parse_config(
    raw: bytes | str, *, source: str = "gateway.toml", default_upstream_url: str | None = None
) -> Config:
    try:
        config = msgspec.toml.decode(raw, type=Config)
    except msgspec.ValidationError as exc:
        raise ConfigError(_one_line(f"{source}: {_describe(exc, raw)}")) from None
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(_one_line(f"{source}: not valid TOML: {exc}")) from None
    if default_upstream_url is not None:
        upstreams = dict(config.upstreams)
        base = upstreams.get(_DEFAULT_UPSTREAM, Upstream(url=default_upstream_url))
        upstreams[_DEFAULT_UPSTREAM] = msgspec.structs.replace(base, url=default_upstream_url)
        config = msgspec.structs.replace(config, upstreams=upstreams)
    try:
        validate(config)
    except ConfigError as exc:
        raise ConfigError(_one_line(f"{source}: {exc}")) from None
    return config


def _one_line(text: str) -> str:
    # Keys and values come from the file: a quoted key may hold a newline, the message may not.
    return re.sub(r"[\x00-\x1f\x7f]", lambda m: repr(m[0])[1:-1], text)


def _describe(exc: msgspec.ValidationError, raw: bytes | str) -> str:
    # msgspec says "... - at `$.tiers.free.included_units`"; lead with the key instead.
    text = str(exc)
    match = re.fullmatch(r"(?P<msg>.*?)(?: - at `\$(?P<at>[^`]*)`)?", text, re.DOTALL)
    assert match is not None  # the pattern matches any text
    msg, key = match["msg"], (match["at"] or "").lstrip(".")
    unknown = re.fullmatch(r"Object contains unknown field `(?P<field>.*)`", msg, re.DOTALL)
    if unknown:
        # Name the offending key itself: "routes[2].prize: unknown key".
        key, msg = f"{key}.{unknown['field']}" if key else unknown["field"], "unknown key"
    key = key or "(top level)"
    key = re.sub(r"\[(\d+)\]", lambda m: f"[{int(m[1]) + 1}]", key)  # 1-based like TOML readers
    section = key.partition("[...]")[0]
    if section in _NAMED_SECTIONS and key.startswith(f"{section}[...]"):
        # msgspec writes a table key as [...]: find which named entry fails.
        name = _failing_entry(raw, section)
        if name is not None:
            key = f"{section}.{name}" + key.removeprefix(f"{section}[...]")
    return f"{key}: {msg}"


_NAMED_SECTIONS: dict[str, type[Any]] = {"tiers": Tier, "upstreams": Upstream}


def _failing_entry(raw: bytes | str, section: str) -> str | None:
    try:
        table = tomllib.loads(raw.decode() if isinstance(raw, bytes) else raw).get(section)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(table, dict):
        return None
    for name, value in table.items():
        try:
            msgspec.convert(value, _NAMED_SECTIONS[section])
        except msgspec.ValidationError:
            return str(name)
    return None


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
        for field in ("monthly_price_usd", "overage_unit_price_usd"):
            price = getattr(tier, field)
            # TOML allows nan and inf; comparing a NaN Decimal raises InvalidOperation.
            if price is not None and not price.is_finite():
                raise ConfigError(f"tiers.{name}.{field}: must be a finite number")
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
    if config.gateway.metrics_listen:
        _validate_listen(config.gateway.metrics_listen, "gateway.metrics_listen")
    for status in config.metering.refund_statuses:
        if not 500 <= status <= 599:
            raise ConfigError(f"metering.refund_statuses: {status} is not a 5xx status")
    if len(set(config.metering.refund_statuses)) != len(config.metering.refund_statuses):
        raise ConfigError("metering.refund_statuses: a status is listed twice")
    _validate_routes(config)


def check_url(url: str, key: str) -> None:
    try:
        parts = urlsplit(url)
    except ValueError as exc:  # "Invalid IPv6 URL": an unclosed [ in the host
        raise ConfigError(f"{key}: bad URL {url!r} ({exc})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{key}: bad URL {url!r} (expected http://host[:port])")
    try:
        port = parts.port
    except ValueError:
        raise ConfigError(f"{key}: bad port in URL {url!r}") from None
    if port == 0:
        raise ConfigError(f"{key}: bad port in URL {url!r} (expected 1-65535)")
    if parts.username is not None or parts.password is not None:
        # The client would drop them silently; credentials do not belong in gateway.toml.
        raise ConfigError(f"{key}: URL may not carry user:password@ (secrets stay out of the file)")
    if parts.query or parts.fragment:
        raise ConfigError(f"{key}: URL {url!r} may not carry a query or fragment")


def parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    # isascii: str.isdigit accepts fullwidth digits, which int() reads as ASCII ones.
    if not sep or not host or not (port.isascii() and port.isdigit()) or int(port) > 65535:
        raise ValueError(f"bad listen address {value!r} (expected host:port)")
    bracketed = host.startswith("[") and host.endswith("]")
    host = host[1:-1] if bracketed else host
    if not _is_host(host, ipv6=bracketed or ":" in host):
        raise ValueError(f"bad listen address {value!r} (host is not an IP address or hostname)")
    return host, int(port)


def _is_host(host: str, *, ipv6: bool) -> bool:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    if ipv6 or address is not None:
        return address is not None and (address.version == 6) == ipv6
    labels = host.removesuffix(".").split(".")
    # An all-numeric last label is a (bad) IPv4 address such as 999.1.1.1, not a name.
    return (
        len(host) <= 253
        and all(re.fullmatch(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)", label) for label in labels)
        and not labels[-1].isdigit()
    )


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
        if auth.public_key_file:
            _check_public_key(auth, auth.public_key_file)
    elif auth.public_key_file or auth.jwks_url:
        raise ConfigError("auth: public_key_file/jwks_url need an RS*, ES* or PS* algorithm")


def _check_public_key(auth: Auth, path: str) -> None:
    # Read here so `metergate check` catches it, not the first request after a deploy.
    key = "auth.public_key_file"
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path}: {exc.strerror or exc}") from None
    import jwt  # only for RS/ES configs: keeps `import config` light for every command

    algorithms = jwt.algorithms.get_default_algorithms()
    for name in auth.algorithms:
        try:
            prepared = algorithms[name].prepare_key(data)
        except (jwt.PyJWTError, ValueError, TypeError) as exc:
            raise ConfigError(f"{key}: {path} is not a public key for {name}: {exc}") from None
        if hasattr(prepared, "private_bytes"):
            # PyJWT cannot verify with a private key object (every request would fail), and
            # the gateway has no business holding the signing key.
            raise ConfigError(f"{key}: {path} holds a private key; give the public key")


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
        if route.tiers is not None and not route.tiers:
            # The proxy reads an empty list as "every tier": refuse the ambiguity.
            raise ConfigError(f"{key}.tiers: empty (omit it to allow every tier)")
        for tier in route.tiers or ():
            if tier not in config.tiers:
                raise ConfigError(f"{key}.tiers: unknown tier {tier!r}")
        if route.public and route.cost:
            raise ConfigError(f"{key}.cost: a public route cannot cost units (no account)")
        if route.public and route.tiers:
            raise ConfigError(f"{key}.tiers: a public route has no account to check a tier of")
        limit = config.limits.max_request_body_bytes
        if route.max_body_bytes is not None and route.max_body_bytes > limit:
            raise ConfigError(f"{key}.max_body_bytes: over limits.max_request_body_bytes ({limit})")
        if route.tiers and not config.metering.enabled:
            raise ConfigError(f"{key}.tiers: needs metering.enabled (the tier lives in Redis)")
        for other_index, other, other_pattern in seen:
            shared = set(route.methods) & set(other.methods)
            if shared and pattern.overlaps(other_pattern):
                what = "duplicates" if pattern.text == other_pattern.text else "overlaps"
                raise ConfigError(
                    f"{key}.path: {route.path!r} {what} routes[{other_index}] "
                    f"{other.path!r} for {'/'.join(sorted(shared))}"
                )
        seen.append((index, route, pattern))
