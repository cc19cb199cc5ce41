"""Deployment settings: where things listen and connect, and the secrets.

They come from the environment (twelve-factor), never from gateway.toml, and override
the file's defaults for listen addresses and worker count.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import msgspec

from config.load import ConfigError, check_url, load_config, parse_listen
from config.model import Config

# Used only when METERGATE_JWT_SECRET is unset; every entry point says so loudly.
DEV_JWT_SECRET = "metergate-dev-secret-not-for-production"
DEFAULT_CONFIG_PATH = "gateway.toml"
_REDIS_SCHEMES = ("redis://", "rediss://", "unix://", "redis+cluster://", "rediss+cluster://")
# Where `metergate gateway` and `metergate admin` look when METERGATE_REDIS_URL is unset.
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
# TLS options redis-py reads from a rediss:// URL's query that name files.
_TLS_FILES = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile")
_CERT_REQS = ("none", "optional", "required")


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    config_path: str
    config: Config
    redis_url: str | None
    jwt_secret: str
    dev_secret: bool
    gateway_host: str
    gateway_port: int
    admin_host: str
    admin_port: int
    workers: int
    # Where /metrics is served when not on the gateway's port (gateway.metrics_listen).
    metrics_host: str | None = None
    metrics_port: int = 0


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Read the environment and the config file it names; raise ConfigError in one line."""
    env = os.environ if env is None else env
    path = env.get("METERGATE_CONFIG") or DEFAULT_CONFIG_PATH
    upstream = env.get("METERGATE_UPSTREAM_URL") or None
    if upstream is not None:
        check_url(upstream, "METERGATE_UPSTREAM_URL")
    config = load_config(Path(path), default_upstream_url=upstream)

    def listen(var: str, default: str) -> tuple[str, int]:
        try:
            return parse_listen(env.get(var) or default)
        except ValueError as exc:
            raise ConfigError(f"{var}: {exc}") from None

    gw_host, gw_port = listen("METERGATE_GATEWAY_LISTEN", config.gateway.listen)
    ad_host, ad_port = listen("METERGATE_ADMIN_LISTEN", config.admin.listen)
    metrics_host: str | None = None
    metrics_port = 0
    metrics_var = "METERGATE_GATEWAY_METRICS_LISTEN"
    metrics_listen = env.get(metrics_var) or config.gateway.metrics_listen
    if metrics_listen:
        metrics_key = metrics_var if env.get(metrics_var) else "gateway.metrics_listen"
        metrics_host, metrics_port = listen(metrics_var, metrics_listen)
        # Any host: with several workers (SO_REUSEPORT) 127.0.0.1:P, localhost:P and
        # 0.0.0.0:P would all bind beside the gateway's port and take part of its traffic.
        if metrics_port == gw_port:
            raise ConfigError(
                f"{metrics_key}: port {metrics_port} is the gateway's; leave it empty to serve "
                "/metrics on the gateway's port"
            )
        if metrics_port == 0:
            # Each worker would get a port of its own, and no scraper would know them.
            raise ConfigError(f"{metrics_key}: a fixed port is needed (not 0)")
    workers_raw = env.get("METERGATE_GATEWAY_WORKERS")
    if workers_raw:
        # isascii: "²".isdigit() is True but int("²") raises.
        if not (workers_raw.isascii() and workers_raw.isdigit()):
            raise ConfigError(f"METERGATE_GATEWAY_WORKERS: {workers_raw!r} is not a number >= 0")
        workers = int(workers_raw)
    else:
        workers = config.gateway.workers
    if workers == 0:
        workers = os.cpu_count() or 1
    redis_url = env.get("METERGATE_REDIS_URL") or None
    if redis_url is not None:
        try:
            _check_redis_url(redis_url)
        except ValueError as exc:
            raise ConfigError(f"METERGATE_REDIS_URL: {exc}") from None
    secret = env.get("METERGATE_JWT_SECRET") or ""
    _check_secret_length(secret, config)
    return Settings(
        config_path=path,
        config=config,
        redis_url=redis_url,
        jwt_secret=secret or DEV_JWT_SECRET,
        dev_secret=not secret,
        gateway_host=gw_host,
        gateway_port=gw_port,
        admin_host=ad_host,
        admin_port=ad_port,
        workers=workers,
        metrics_host=metrics_host,
        metrics_port=metrics_port,
    )


def _check_redis_url(url: str) -> None:
    # redis-py reads a bad port or database late (at the first command, from a worker) or
    # not at all ("/abc" silently means database 0): refuse them at start instead.
    if not url.startswith(_REDIS_SCHEMES):
        raise ValueError(
            "expected redis://, rediss://, unix://, redis+cluster:// or rediss+cluster:// URL"
        )
    try:
        parts = urlsplit(url)
        port = parts.port  # raises on a non-numeric or out-of-range port
    except ValueError as exc:
        raise ValueError(f"bad URL ({exc})") from None
    query = parse_qs(parts.query)
    if parts.scheme == "unix":
        if not parts.path:
            raise ValueError("unix:// needs a socket path (unix:///path/to/redis.sock)")
        db = query.get("db", [""])[-1]
    else:
        if not parts.hostname:
            raise ValueError(f"{parts.scheme}:// needs a host (e.g. {parts.scheme}://host:6379)")
        if port == 0:
            raise ValueError("port 0 is not a Redis port (expected 1-65535)")
        db = query.get("db", [unquote(parts.path).strip("/")])[-1]
    if db and not (db.isascii() and db.isdigit()):
        raise ValueError(f"database {db!r} is not a number")
    if parts.scheme.endswith("+cluster") and db not in ("", "0"):
        raise ValueError("a Redis Cluster has only database 0")
    _check_tls_options(url, parts.scheme, query)


def _check_tls_options(url: str, scheme: str, query: Mapping[str, list[str]]) -> None:
    # redis-py opens these files, or refuses these values, only when it first connects: in
    # a worker, as a 503 on every request. Say so at start instead.
    options = sorted(k for k in query if k.startswith("ssl_"))
    if options and not scheme.startswith("rediss"):
        raise ValueError(f"{options[0]} needs a rediss:// URL (TLS)")
    for name in _TLS_FILES:
        for value in query.get(name, []):
            if not Path(value).is_file():
                raise ValueError(f"{name}: no such file {value}")
    if "ssl_keyfile" in query and "ssl_certfile" not in query:
        raise ValueError("ssl_keyfile needs ssl_certfile (the client certificate)")
    for value in query.get("ssl_cert_reqs", []):
        if value not in _CERT_REQS:
            raise ValueError(f"ssl_cert_reqs: expected none, optional or required, not {value!r}")
    if not scheme.endswith("+cluster"):  # a cluster client takes other options
        _check_with_redis_py(url)


def _check_with_redis_py(url: str) -> None:
    """Build what redis-py builds at the first connect: the connection (an option it does
    not know is a TypeError there) and, for TLS, its context with the files loaded."""
    from redis.asyncio.connection import Connection, SSLConnection, parse_url
    from redis.exceptions import RedisError

    options: dict[str, Any] = dict(parse_url(url))  # ValueError: a value of the wrong type
    connection_class = options.pop("connection_class", Connection)
    for pool_option in ("max_connections", "timeout"):
        options.pop(pool_option, None)
    try:
        connection = connection_class(**options)
    except TypeError as exc:
        name = re.search(r"argument '(\w+)'", str(exc))
        raise ValueError(f"unknown option {name[1] if name else exc}") from None
    if isinstance(connection, SSLConnection):
        try:
            connection.ssl_context.get()
        except (OSError, ValueError, TypeError, RedisError) as exc:  # SSLError: an OSError
            raise ValueError(f"TLS: {exc}") from None


def _check_secret_length(secret: str, config: Config) -> None:
    # RFC 7518 3.2: an HMAC key MUST be at least as long as the hash output. PyJWT only
    # warns, on every token; refusing at start is clearer.
    for algorithm in config.auth.algorithms:
        if secret and algorithm.startswith("HS"):
            needed = int(algorithm[2:]) // 8
            if len(secret.encode()) < needed:
                raise ConfigError(
                    f"METERGATE_JWT_SECRET: {algorithm} needs at least {needed} bytes "
                    f"(RFC 7518 3.2), got {len(secret.encode())}"
                )
